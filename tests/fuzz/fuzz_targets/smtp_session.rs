//! The ingress SMTP session as a whole, fed any byte stream a client may send, from a client
//! allowed to relay or from a stranger. The policy, the session table, the memory bound and
//! the group commit are the real ones; only the commit to the controllers is in memory.
//! Checked: no panic; every reply line is well formed; a message is answered `queued as`
//! exactly when it was committed; a committed message has recipients and only CRLF line
//! endings; every byte of the memory bound is given back when the session ends.
#![no_main]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sluice_common::policy::{LoadOptions, Policy, load_str};
use sluice_common::settings::Settings;
use sluice_common::smtp::reply::parse_line;
use sluice_ingress::Shared;
use sluice_ingress::enqueuer::Enqueuer;
use sluice_ingress::smtp::conn::Conn;
use sluice_ingress::smtp::session::Session;
use sluice_proto::queue::NewMessage;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POLICY: &str = "host-name mx.example.com
<virtual-mta v1>
  smtp-source-host 127.0.0.1 v1.example.com
</virtual-mta>
<domain *>
  route [127.0.0.1]:9
</domain>
<source 127.0.0.1>
  always-allow-relaying yes
  default-virtual-mta v1
  max-message-size 64K
</source>
<source 0/0>
  allow-unencrypted-plain-auth yes
  max-message-size 64K
</source>
<source {auth}>
  always-allow-relaying yes
</source>
<smtp-user alice>
  password \"s3cret\"
  source {auth}
</smtp-user>
";

static POLICY_PARSED: LazyLock<Policy> = LazyLock::new(|| {
    let opts = LoadOptions { read_files: false };
    load_str(Path::new("/nonexistent/fuzz/policy.conf"), POLICY, opts)
        .expect("the fuzz policy parses")
        .policy
});

fuzz_target!(|data: &[u8]| {
    let Some((&who, input)) = data.split_first() else {
        return;
    };
    // The relaying client, or a stranger (a documentation address: nothing is connected).
    let peer: SocketAddr = if who & 1 == 0 {
        "127.0.0.1:40000".parse().unwrap()
    } else {
        "192.0.2.7:40000".parse().unwrap()
    };
    // Paused time: timeouts and AUTH pauses pass at once when the session would wait.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(session(peer, input));
});

async fn session(peer: SocketAddr, input: &[u8]) {
    let committed: Arc<Mutex<Vec<NewMessage>>> = Arc::default();
    let store = committed.clone();
    let enqueuer = Enqueuer::with_commit(1 << 20, move |req| {
        let store = store.clone();
        async move {
            let mut kept = store.lock().unwrap();
            let first = kept.len() as u64 + 1;
            let n = req.messages.len() as u64;
            kept.extend(req.messages);
            Ok((first..first + n).collect())
        }
    });
    let mut settings = Settings::default();
    settings.ingress.max_bytes_in_flight = 1 << 20;
    let shared =
        Arc::new(Shared::new(&settings, 1, POLICY_PARSED.clone(), enqueuer).expect("shared state"));
    let memory = shared.bytes_in_flight.available_permits();
    let (client, server) = tokio::io::duplex(16 << 10);
    let local: SocketAddr = "127.0.0.1:25".parse().unwrap();
    let conn = Conn::new(server, Duration::from_secs(60));
    let run = tokio::spawn(Session::new(shared.clone(), conn, peer, local).run());
    let (mut rd, mut wr) = tokio::io::split(client);
    let input = input.to_vec();
    let writer = tokio::spawn(async move {
        // The session may stop reading (QUIT, too many errors): later bytes are not sent.
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
    });
    let mut out = Vec::new();
    let _ = rd.read_to_end(&mut out).await;
    run.await.expect("the session does not panic");
    writer.abort();

    let text = String::from_utf8_lossy(&out);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut acknowledged = 0;
    for line in &lines {
        let body = line
            .strip_suffix("\r\n")
            .unwrap_or_else(|| panic!("a reply line without CRLF: {line:?}"));
        parse_line(body.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        if body.starts_with("250 ") && body.contains(" queued as ") {
            acknowledged += 1;
        }
    }
    let committed = committed.lock().unwrap();
    assert_eq!(acknowledged, committed.len(), "acknowledged vs committed");
    for m in committed.iter() {
        assert!(!m.recipients.is_empty(), "a message without recipients");
        let body = &m.body;
        for (i, &b) in body.iter().enumerate() {
            match b {
                b'\n' => assert!(i > 0 && body[i - 1] == b'\r', "a bare LF was kept"),
                b'\r' => assert!(body.get(i + 1) == Some(&b'\n'), "a bare CR was kept"),
                0 => panic!("a NUL was kept"),
                _ => {}
            }
        }
    }
    assert_eq!(
        shared.bytes_in_flight.available_permits(),
        memory,
        "memory reserved for message data was not given back"
    );
}
