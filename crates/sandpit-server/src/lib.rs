//! sandpit-server
