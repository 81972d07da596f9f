//! dbproxy (being built): see api.rs for the contract.
pub mod api;
