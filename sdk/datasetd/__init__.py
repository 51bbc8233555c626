"""datasetd: the generated protos (datasetd.v1) and the client library (datasetd.client)."""

from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
