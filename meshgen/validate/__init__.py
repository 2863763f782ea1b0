"""Real tools run on rendered output: the Envoy protos (xds-protos) and the Envoy binary."""
