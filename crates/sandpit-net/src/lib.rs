//! sandpit-net
