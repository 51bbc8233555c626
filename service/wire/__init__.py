"""The proto <-> domain mapping of the data model (datasets, inputs, data, annotations,
Struct, timestamps), shared by the gRPC servicers and the archive formats so that an
input reads the same through GetInput, a version snapshot and an export."""
