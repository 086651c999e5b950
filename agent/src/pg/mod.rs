//! PostgreSQL: wire protocol framing (`wire`) and statement classification with the real
//! PostgreSQL parser (`classify`).

pub mod catalog;
pub mod classify;
pub mod copy;
pub mod functions;
pub mod handler;
pub mod pool;
pub mod redact;
pub mod scram;
pub mod startup;
pub mod upstream;
pub mod verdict;
pub mod wire;

#[cfg(test)]
mod inprocess;
