//! sandpit-test-support
