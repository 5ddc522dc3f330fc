//! sandpit-api-types
