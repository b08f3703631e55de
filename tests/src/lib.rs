//! Test support: run `perch`, drive workloads, read kernel counters.
