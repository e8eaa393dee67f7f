//! Ferro end-to-end harness: starts real etcd, real `ferro` processes and hosts in network namespaces.
