//! The QMP client's reading of what QEMU sends: each line as JSON, what it
//! means for the waiting command, and the run state in a `query-status`
//! answer.

#![no_main]

use libfuzzer_sys::fuzz_target;
use metald_core::ports::VmmError;
use metald_vmm::qemu::qmp;
use serde_json::Value;

/// What a message meant, comparable across re-encodings. Refusals are
/// compared by kind only: their text quotes the message, and serde_json
/// may print a float differently once re-encoded (`…4407e26` and
/// `…44074e26` are one number's two spellings).
#[derive(Debug, PartialEq)]
enum Meaning {
    Skipped,
    Error,
    Returned(Option<String>),
}

fn meaning(msg: &Value) -> Meaning {
    match qmp::outcome("query-status", msg) {
        None => Meaning::Skipped,
        Some(Err(e)) => {
            // A QMP error reply is the VMM refusing the command.
            assert!(matches!(e, VmmError::Refused(_)), "{e:?}");
            assert!(e.message().starts_with("QMP query-status: "), "{e}");
            Meaning::Error
        }
        Some(Ok(ret)) => {
            assert_eq!(msg.get("return"), Some(&ret));
            let state = qmp::run_state(&ret);
            if let Ok(s) = &state {
                assert_eq!(ret["status"].as_str(), Some(s.as_str()));
            }
            Meaning::Returned(state.ok())
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The client reads whole lines (bounded in length), newline included,
    // as bytes; one that is not JSON is a read error.
    for line in data.split_inclusive(|b| *b == b'\n') {
        let Ok(msg) = qmp::parse_message(line) else {
            continue;
        };
        let _ = msg.get("QMP");
        let first = meaning(&msg);
        // The same message, sent in serde_json's own encoding, means the same.
        let again =
            qmp::parse_message(format!("{msg}\n").as_bytes()).expect("re-encoded message parses");
        assert_eq!(meaning(&again), first);
    }
});
