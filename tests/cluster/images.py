"""The images a real node of the test cluster runs, built with buildah, cached by content.

No registry is reachable here, so every image is built on this machine:

- stand-in base: Debian 12 (python3 is 3.11) from `debootstrap`, tagged `BASE` and passed to both
  Dockerfiles as their base build argument (their defaults stay the public bases);
- `operator/Dockerfile` and `trainer-image/Dockerfile` of the repo;
- pause (the pod sandbox) and CoreDNS, from the binaries `build-node.sh` built, `FROM scratch`.

Each image's tag is `localhost/kubetune/<name>:<hash>`, the hash over its Containerfile, build
arguments and context files, so an unchanged image is not rebuilt; buildah's own layer cache
(`--layers`) makes a source change rebuild only the layers after the dependencies. The buildah
storage lives in ~/.cache/kubetune/buildah-<driver>. `load(tag, ctr_address, containerd_root)` imports
an image into a containerd's `k8s.io` namespace, sending only the layers that containerd lacks.
`store_lock()` serializes the builds and the containerd seed between test sessions of this machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .binaries import cache_root

REPO = Path(__file__).resolve().parents[2]
DEBIAN_SUITE, DEBIAN_MIRROR = "bookworm", "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE = f"localhost/kubetune/debian-python:{DEBIAN_SUITE}"   # python3 3.11, like python:3.11-slim
STORAGE_DRIVER = "overlay"
log = logging.getLogger(__name__)


class ImageError(RuntimeError):
    pass


@dataclass(frozen=True)
class Image:
    name: str
    containerfile: Path
    context: Path
    files: tuple[str, ...]              # context paths (files or folders) the image is built from
    build_args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"localhost/kubetune/{self.name}:{self.content_hash()}"

    def content_hash(self) -> str:
        digest = hashlib.sha256(self.containerfile.read_bytes())
        for key, value in sorted(self.build_args.items()):
            digest.update(f"\0arg {key}={value}".encode())
        for path in context_files(self.context, self.files):
            digest.update(f"\0{path.relative_to(self.context)}\0".encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


def context_files(context: Path, names: tuple[str, ...]) -> list[Path]:
    out = []
    for name in names:
        path = context / name
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        elif path.is_file():
            out.append(path)
    return out


PYTHON_SOURCES = ("pyproject.toml", "constraints.txt", "README.md", "operator/kubetune",
                  "trainer-image/kubetune_trainer")


def operator_image() -> Image:
    return Image("operator", REPO / "operator" / "Dockerfile", REPO,
                 ("operator/Dockerfile", *PYTHON_SOURCES), {"BASE_IMAGE": BASE})


def trainer_image() -> Image:
    return Image("trainer", REPO / "trainer-image" / "Dockerfile", REPO,
                 ("trainer-image/Dockerfile", *PYTHON_SOURCES), {"BASE_IMAGE": BASE})


def binary_image(name: str, binary: Path, entrypoint: list[str]) -> Image:
    """An image holding one static binary at /<name> (pause, CoreDNS)."""
    folder = cache_root() / "image-context" / name
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / name).exists() or (folder / name).read_bytes() != binary.read_bytes():
        shutil.copy2(binary, folder / name)
    entry = ", ".join(f'"{a}"' for a in entrypoint)
    (folder / "Containerfile").write_text(f"FROM scratch\nCOPY {name} /{name}\n"
                                          f"USER 65532:65532\nENTRYPOINT [{entry}]\n")
    return Image(name, folder / "Containerfile", folder, (name,))


@contextlib.contextmanager
def store_lock():
    """Held while images are built and the containerd seed is made or cloned: two test sessions
    (each its own cluster) share the buildah storage and the seed, which one of them may replace.
    Not reentrant (flock locks per open file): take it once, around the whole step."""
    path = cache_root() / "image-store.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another session's image build or seed (%s)", path)
            started = time.monotonic()
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("waited %.0fs for the image store", time.monotonic() - started)
        yield


# -- buildah ------------------------------------------------------------------------------------

def buildah(*args: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    storage = cache_root() / f"buildah-{STORAGE_DRIVER}"
    argv = ["buildah", f"--root={storage}/root", f"--runroot={storage}/run",
            f"--storage-driver={STORAGE_DRIVER}", *args]
    proc = subprocess.run(argv, capture_output=capture, text=True, **kw)
    if check and proc.returncode != 0:
        raise ImageError(f"buildah {' '.join(args[:3])} failed ({proc.returncode}):\n"
                         f"{(proc.stderr or '')[-3000:]}")
    return proc


def exists(tag: str) -> bool:
    return buildah("inspect", "--type=image", tag, check=False).returncode == 0


def ensure_base() -> str:
    """The stand-in base: Debian from debootstrap, with python3 and venv, no pip cache or lists."""
    if exists(BASE):
        return BASE
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kubetune-base-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR], "debootstrap")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tarball = Path(tmp) / "rootfs.tar"
        run(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."], "tar")
        container = buildah("from", "scratch").stdout.strip()
        try:
            buildah("add", container, str(tarball), "/")
            buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "--env", "LANG=C.UTF-8", "--cmd", "python3", container)
            buildah("commit", "--rm", container, BASE)
        except BaseException:
            buildah("rm", container, check=False)
            raise
    log.info("built %s in %.0fs", BASE, time.monotonic() - started)
    return BASE


# pip inside a build reaches the package index as this machine does (its CA bundle, its pip.conf).
HOST_PIP_FILES = ("/etc/pip.conf", "/etc/ssl/certs/ca-certificates.crt")


def build(image: Image) -> str:
    """Build `image` unless its content-hash tag exists; the tag."""
    tag = image.tag
    if exists(tag):
        return tag
    started = time.monotonic()
    args = ["bud", "--layers", "--network=host", "-f", str(image.containerfile), "-t", tag]
    for key, value in image.build_args.items():
        args.append(f"--build-arg={key}={value}")
    for path in HOST_PIP_FILES:
        if os.path.exists(path):
            args.append(f"--volume={path}:{path}:ro")
    log_path = cache_root() / f"image-{image.name}.log"
    with open(log_path, "w") as out:
        proc = buildah(*args, str(image.context), check=False, capture=False, stdout=out,
                       stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise ImageError(f"building the {image.name} image failed; end of {log_path}:\n"
                         f"{log_path.read_text(errors='replace')[-3000:]}")
    log.info("built %s in %.0fs", tag, time.monotonic() - started)
    return tag


# -- into containerd: only the layers it lacks ---------------------------------------------------
#
# containerd's content store keeps blobs by digest, as an OCI layout does. skopeo copies an image
# into a layout whose blobs are hard links of the store's own (containers/image skips a blob
# already there) and leaves new layers uncompressed, so a layer's digest is its diff ID, the same
# at every build and in both stores. `ctr import` then gets a tar of the manifest, the config and
# the layers containerd lacks: after a source change, the few MB of the source layers, not 7 GB.

CONTENT_BLOBS = Path("io.containerd.content.v1.content/blobs/sha256")   # under a containerd root
IMAGE_NAME = "io.containerd.image.name"   # the annotation ctr import names an image by
OCI_LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'


def storage_reference(tag: str) -> str:
    storage = cache_root() / f"buildah-{STORAGE_DRIVER}"
    return f"containers-storage:[{STORAGE_DRIVER}@{storage}/root+{storage}/run]{tag}"


def blobs_to_send(manifest_digest: str, manifest: dict, have: set[str]) -> list[str]:
    """Hex digests of the blobs an import must carry: the manifest and the config always (tiny),
    the layers only where the content store (`have`, hex digests) lacks them."""
    layers = [hex_of(layer["digest"]) for layer in manifest["layers"]]
    return [hex_of(manifest_digest), hex_of(manifest["config"]["digest"]),
            *(d for d in dict.fromkeys(layers) if d not in have)]


def image_digests(listing: str) -> list[str]:
    """The manifest (or index) digest of each image in `ctr images ls` output."""
    return [line.split()[2] for line in listing.splitlines()[1:] if line.strip()]


def held_by(digest: str, read) -> set[str]:
    """Hex digests of the blobs held by an image whose top blob is `digest` (`read(hex)`: a blob's
    JSON): a manifest, its config and layers; an index and each of its manifests in turn. Only these
    are sure to stay in the store while an import is prepared: any other blob, as the index an
    earlier `ctr import` wrote, is garbage that containerd's collector may remove meanwhile."""
    document = read(digest)
    if "manifests" in document:
        return {digest}.union(*(held_by(hex_of(m["digest"]), read) for m in document["manifests"]))
    layers = (hex_of(layer["digest"]) for layer in document["layers"])
    return {digest, hex_of(document["config"]["digest"]), *layers}


def import_index(manifest: dict, names: tuple[str, ...]) -> dict:
    """An OCI index naming one manifest descriptor once per image name."""
    return {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{"mediaType": manifest["mediaType"], "digest": manifest["digest"],
                           "size": manifest["size"], "annotations": {IMAGE_NAME: name}} for name in names]}


def hex_of(digest: str) -> str:
    algorithm, _, value = digest.partition(":")
    if algorithm != "sha256":
        raise ImageError(f"unexpected digest {digest!r}: containerd's store here holds sha256 blobs")
    return value


def load(tag: str, ctr_address: Path, containerd_root: Path, aliases: tuple[str, ...] = ()) -> int:
    """Import `tag` (also named `aliases`) into the containerd at `ctr_address`, whose root
    folder is `containerd_root`, namespace k8s.io; the bytes of layers it had to send."""
    content = containerd_root / CONTENT_BLOBS
    listing = run(["ctr", f"--address={ctr_address}", "-n", "k8s.io", "images", "ls"], "ctr images ls")
    have = {blob for digest in image_digests(listing)
            for blob in held_by(hex_of(digest), lambda d: json.loads((content / d).read_bytes()))}
    with tempfile.TemporaryDirectory(prefix="kubetune-oci-", dir=cache_root()) as tmp:
        blobs = Path(tmp) / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        for name in have:
            os.link(content / name, blobs / name)
        run(["skopeo", "copy", "--quiet", "--dest-oci-accept-uncompressed-layers",
             storage_reference(tag), f"oci:{tmp}:{tag}"], f"skopeo copy {tag}")
        descriptor = json.loads((Path(tmp) / "index.json").read_text())["manifests"][0]
        manifest = json.loads((blobs / hex_of(descriptor["digest"])).read_text())
        send = blobs_to_send(descriptor["digest"], manifest, have)
        index = json.dumps(import_index(descriptor, (tag, *aliases))).encode()
        ctr_import(ctr_address, blobs, send, index, tag)
        return sum(layer["size"] for layer in manifest["layers"] if hex_of(layer["digest"]) in send)


def ctr_import(ctr_address: Path, blobs: Path, send: list[str], index: bytes, what: str) -> None:
    """Stream an OCI archive (layout file, index, the `send` blobs) into `ctr images import -`."""
    argv = ["ctr", f"--address={ctr_address}", "-n", "k8s.io", "images", "import", "-"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                for name, data in (("oci-layout", OCI_LAYOUT), ("index.json", index)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                for digest in send:
                    tar.add(blobs / digest, f"blobs/sha256/{digest}")
        except BrokenPipeError:
            pass   # ctr stopped reading: its exit status and stderr say why
        finally:
            proc.stdin.close()
        if proc.wait() != 0:
            err.seek(0)
            raise ImageError(f"ctr import {what} failed ({proc.returncode}): "
                             f"{err.read().decode(errors='replace')[-2000:]}")


def run(argv: list[str], what: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ImageError(f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")
    return proc.stdout
