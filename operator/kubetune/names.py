"""The names of a run's children, all derived from the run's name, and the limit that follows.

The longest is a training pod's hostname `<run>-train-<attempt>-<index>`, a DNS label of at
most 63 characters. With the API's bounds on attempts (backoffLimit + 1) and nodes it fixes how
long a run's name may be (`MAX_RUN_NAME_LENGTH`): the API, the CRD's CEL rule and the builders
all take it from here.
"""

from __future__ import annotations

import re

DNS_LABEL_MAX = 63
MAX_BACKOFF_LIMIT = 100  # restarts of all ranks; attempts are numbered 1..MAX_BACKOFF_LIMIT + 1
MAX_NODES = 1024
_DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def config_map_name(run_name: str) -> str:
    return f"{run_name}-config"


def prep_job_name(run_name: str) -> str:
    return f"{run_name}-prep"


def service_name(run_name: str) -> str:
    return f"{run_name}-train"


def train_job_name(run_name: str, attempt: int) -> str:
    return f"{run_name}-train-{attempt}"


def finalize_job_name(run_name: str) -> str:
    return f"{run_name}-finalize"


def cleanup_job_name(run_name: str) -> str:
    return f"{run_name}-cleanup"


def rank_hostname(run_name: str, attempt: int, index: int) -> str:
    """The hostname the Job controller gives an Indexed Job's pod: `<job>-<index>`."""
    return f"{train_job_name(run_name, attempt)}-{index}"


MAX_RUN_NAME_LENGTH = DNS_LABEL_MAX - len(rank_hostname("", MAX_BACKOFF_LIMIT + 1, MAX_NODES - 1))


def name_problem(run_name: str, max_attempt: int, nodes: int) -> str | None:
    """Why the run's name cannot name its children (a Service and pod hostnames), or None."""
    if not _DNS_1035_LABEL.match(run_name):
        return (f"metadata.name {run_name!r} must be a DNS-1035 label (lowercase letters, digits "
                "and '-', starting with a letter): it names the run's Service and pods")
    longest = rank_hostname(run_name, max_attempt, max(nodes - 1, 0))
    if len(longest) > DNS_LABEL_MAX:
        room = DNS_LABEL_MAX - (len(longest) - len(run_name))
        return (f"metadata.name {run_name!r} is too long: at most {room} characters, so that pod "
                f"hostnames such as {longest!r} fit in {DNS_LABEL_MAX}")
    return None
