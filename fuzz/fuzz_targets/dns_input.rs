//! Any bytes as what reaches the DNS proxy: a client's query (`parse_query`, `reply_code`) and,
//! split in halves, a query and the upstream's response to it (`check_response`,
//! `answer_addresses`, `release`).
//!
//! Never panics; every reply decodes and carries the client's id; a released answer holds no
//! A/AAAA address (nor an HTTPS/SVCB address hint) outside the kept set, and fits the client's
//! UDP limit when one is given. The checks are in `agentwall::dns::wire::fuzz_entry`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    agentwall::dns::wire::fuzz_entry(data);
});
