//! sandpit-runtime-gvisor
