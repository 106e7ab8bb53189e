"""The cluster of node stores: the node registry and the work that moves replicas between nodes."""
