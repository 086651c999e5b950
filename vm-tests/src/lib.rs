//! vm-tests helpers
