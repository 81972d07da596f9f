//! The dbproxy's request decoding and checks: arbitrary bytes as API
//! request bodies through serde and `front::Checked`. The harness and its
//! assertions are `chat_dbproxy::fuzzing` (it needs the crate's private
//! layers); see there for the input format.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chat_dbproxy::fuzzing::requests(data));
