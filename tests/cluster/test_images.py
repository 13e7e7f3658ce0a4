"""What an image import into containerd carries (tests/cluster/images.py): only the layers the
content store lacks, under the names asked for."""

from __future__ import annotations

import pytest

from .images import IMAGE_NAME, ImageError, blobs_to_send, held_by, image_digests, import_index

D = {name: f"sha256:{name * 64}" for name in "mcabx"}   # manifest, config, layers a and b, other
MANIFEST = {"config": {"digest": D["c"]},
            "layers": [{"digest": D["a"]}, {"digest": D["b"]}, {"digest": D["a"]}]}


def test_an_import_carries_manifest_config_and_only_the_layers_the_store_lacks():
    assert blobs_to_send(D["m"], MANIFEST, have={"a" * 64, "x" * 64}) == ["m" * 64, "c" * 64, "b" * 64]


def test_a_cold_store_gets_every_layer_once():
    assert blobs_to_send(D["m"], MANIFEST, have=set()) == ["m" * 64, "c" * 64, "a" * 64, "b" * 64]


def test_a_store_holding_every_layer_gets_manifest_and_config_only():
    assert blobs_to_send(D["m"], MANIFEST, have={"a" * 64, "b" * 64, "c" * 64}) == ["m" * 64, "c" * 64]


def test_the_index_names_the_manifest_once_per_name():
    descriptor = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": D["m"], "size": 9}
    index = import_index(descriptor, ("localhost/kubetune/pause:1", "registry.k8s.io/pause:3.10"))
    assert [m["annotations"][IMAGE_NAME] for m in index["manifests"]] == [
        "localhost/kubetune/pause:1", "registry.k8s.io/pause:3.10"]
    assert {m["digest"] for m in index["manifests"]} == {D["m"]}


def test_a_digest_of_another_algorithm_is_refused_by_name():
    with pytest.raises(ImageError, match="sha512:ab"):
        blobs_to_send("sha512:ab", MANIFEST, have=set())


LISTING = """REF                                   TYPE                                       DIGEST   SIZE      PLATFORMS   LABELS
localhost/kubetune/pause:1            application/vnd.oci.image.manifest.v1+json {m}  300.0 KiB linux/amd64 io.cri-containerd.image=managed
registry.k8s.io/pause:3.10            application/vnd.oci.image.manifest.v1+json {m}  300.0 KiB linux/amd64 io.cri-containerd.image=managed
""".format(m=D["m"])


def test_each_listed_image_gives_its_top_digest():
    assert image_digests(LISTING) == [D["m"], D["m"]]
    assert image_digests("REF TYPE DIGEST SIZE PLATFORMS LABELS\n") == []


def test_an_image_holds_its_manifest_config_and_layers_and_nothing_else_in_the_store():
    blobs = {"m" * 64: MANIFEST}
    assert held_by("m" * 64, blobs.__getitem__) == {"m" * 64, "c" * 64, "a" * 64, "b" * 64}


def test_an_index_holds_each_of_its_manifests_with_their_blobs():
    other = {"config": {"digest": D["x"]}, "layers": [{"digest": D["a"]}]}
    blobs = {"i" * 64: {"manifests": [{"digest": D["m"]}, {"digest": f"sha256:{'o' * 64}"}]},
             "m" * 64: MANIFEST, "o" * 64: other}
    assert held_by("i" * 64, blobs.__getitem__) == {
        "i" * 64, "m" * 64, "o" * 64, "c" * 64, "x" * 64, "a" * 64, "b" * 64}
