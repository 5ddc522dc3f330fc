//! sandpit-sdk
