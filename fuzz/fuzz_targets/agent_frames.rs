//! The agent frame codec and the control messages inside frames: arbitrary bytes from the
//! wire never panic, never allocate past `MAX_FRAME_LEN` per frame, and every path the
//! protocol accepts is normalized (absolute, no `.`/`..`/empty components, no NUL).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandpit_agent_proto as proto;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut r = data;
        for _ in 0..16 {
            let Ok(frame) = proto::read_frame(&mut r).await else {
                break;
            };
            assert!(frame.payload.len() <= proto::MAX_FRAME_LEN);
            let _ = frame.parse::<proto::Request>();
            let _ = frame.parse::<serde_json::Value>();
        }
    });
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(p) = proto::normalize_path(text)
    {
        assert!(p.starts_with('/'));
        assert!(!p.contains('\0'));
        assert!(p == "/" || p.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != ".."));
        assert_eq!(proto::normalize_path(&p).ok().as_deref(), Some(p.as_str()));
    }
});
