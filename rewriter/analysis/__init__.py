"""Analysis layer: networkx views of the graph, channel coupling, FLOPs and parameter counts."""
