"""Node servers: shard replicas served over the network (protocol in dfsfuse.storage.protocol)."""
