"""epctl: the operator's command line, the demo, and a local etcd launcher."""
