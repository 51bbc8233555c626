"""The Clarifai front door: `clarifai.api.V2` over gRPC (and, in rest.py, its REST/JSON
mapping), served from clarifai-grpc's generated classes and mapped onto the native
servicer parts, so every rule lives once (in the domain, behind the native API).

Errors travel in-band: the gRPC status is OK and `response.status.code` carries the
Clarifai code (status.py), as the real clients expect."""
