//! Runs every seed of the fuzz corpus through the request parser: none may
//! panic, and the named seeds parse the way their names say.

use vhost_tap::blk::request::{fuzz_parse, RequestError, RequestType};

#[test]
fn every_corpus_file_parses_without_panicking() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/blk_request");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let got = fuzz_parse(&data);
        n += 1;
        let want_ok = |t: RequestType| match &got {
            Some(Ok(r)) => assert_eq!(r.rtype, t, "{name}"),
            other => panic!("{name}: {other:?}"),
        };
        let want_err = |e: RequestError| assert_eq!(got, Some(Err(e)), "{name}");
        match name.as_str() {
            "read" | "header_split" | "indirect" => want_ok(RequestType::In),
            "write" => want_ok(RequestType::Out),
            "flush" => want_ok(RequestType::Flush),
            "get_id" => want_ok(RequestType::GetId),
            "discard" => want_ok(RequestType::Discard),
            "write_zeroes" => want_ok(RequestType::WriteZeroes),
            "unsupported" => want_ok(RequestType::Unsupported(99)),
            "loop" | "self_loop" | "next_out_of_table" => want_err(RequestError::Truncated),
            "out_of_range" => want_err(RequestError::OutOfRange),
            "wrong_order" => want_err(RequestError::WrongOrder),
            "wrong_direction" => want_err(RequestError::WrongDirection),
            "no_status" => want_err(RequestError::NoStatus),
            "indirect_bad_len" => want_err(RequestError::Empty),
            "oversized" => assert!(matches!(got, Some(Err(_))), "{name}: {got:?}"),
            _ => {} // Anything else (including minimized crashes) must just not panic.
        }
    }
    assert!(n >= 20, "corpus has {n} files");
}
