//! The store conformance suite (written below).
