"""kopf's settings as the operator starts it: what it must not do with the rights it holds."""

import kopf

from kubetune.k8s.main import configure_kopf


def test_a_namespaced_operator_does_not_scan_the_cluster_it_has_no_rights_to():
    """Watching named namespaces it holds Roles only: listing Namespaces or watching CRDs would
    be refused (and logged) every time."""
    namespaced, clusterwide = kopf.OperatorSettings(), kopf.OperatorSettings()
    configure_kopf(namespaced, namespaced=True)
    configure_kopf(clusterwide, namespaced=False)
    assert namespaced.scanning.disabled and not clusterwide.scanning.disabled


def test_kopf_bookkeeping_stays_out_of_the_status():
    settings = kopf.OperatorSettings()
    configure_kopf(settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
