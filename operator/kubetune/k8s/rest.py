"""Raw JSON requests through the client's `ApiClient`: its credentials, TLS and connection pool.

The operator reads and writes plain dicts, so it needs none of the typed API classes; importing
`CoreV1Api` and `BatchV1Api` alone costs ~23 MB of memory (each method wrapped for
validation), a tenth of what a thousand runs' operator holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

JSON = "application/json"
MERGE_PATCH = "application/merge-patch+json"


def collection(api_version: str, plural: str, namespace: str | None = None) -> str:
    """The path of a kind's objects, in one namespace or (None) in all of them."""
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    return f"{prefix}/namespaces/{quote(namespace, safe='')}/{plural}" if namespace else f"{prefix}/{plural}"


def member(api_version: str, plural: str, namespace: str, name: str, subresource: str = "") -> str:
    path = f"{collection(api_version, plural, namespace)}/{quote(name, safe='')}"
    return f"{path}/{subresource}" if subresource else path


class Rest:
    def __init__(self, api_client: client.ApiClient):
        self.api_client = api_client

    def request(self, method: str, path: str, *, query: Iterable[tuple[str, str]] = (),
                body: Mapping[str, Any] | None = None, content_type: str = JSON,
                timeout: float | tuple[float, float] | None = None):
        """The unread urllib3 response (the caller reads or streams it, then releases its
        connection); an `ApiException` with the status for any answer but 2xx."""
        headers = {"Accept": JSON, **({"Content-Type": content_type} if body is not None else {})}
        method, url, headers, body, _ = self.api_client.param_serialize(
            method, path, query_params=list(query), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api_client.call_api(method, url, headers, body, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response

    def json(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        return json.loads(self.send(method, path, **options))

    def send(self, method: str, path: str, **options: Any) -> bytes:
        """The answer's bytes, its connection given back to the pool."""
        response = self.request(method, path, **options)
        try:
            return response.data
        finally:
            response.release_conn()
