// SPDX-License-Identifier: Apache-2.0
//! The receiver's timeouts and the migration token, between the real sender
//! and receiver over socketpairs (or against scripted peers).

use super::*;

use crate::migration::auth::Token;

/// Runs the receiver on `stream` with `opts` on a thread.
fn spawn_receiver_with(
    mut stream: Stream,
    mut target: FakeTarget,
    opts: ReceiveOptions,
) -> JoinHandle<(Result<ReceiveReport>, FakeTarget)> {
    thread::spawn(move || {
        let r = receive(&mut stream, &mut target, &opts);
        (r, target)
    })
}

/// The receiver's timeouts set to `ms` milliseconds.
fn quick(ms: u64) -> ReceiveOptions {
    ReceiveOptions::with_timeout(Duration::from_millis(ms))
}

/// What the receiver said before it gave up (its `Error` message, if any).
fn last_words(peer: &mut Stream) -> Vec<Message> {
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut v = Vec::new();
    while let Ok(m) = protocol::read_message(peer) {
        v.push(m);
    }
    v
}

fn error_text(words: &[Message]) -> String {
    words
        .iter()
        .find_map(|m| match m {
            Message::Error { message } => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

#[test]
fn test_receiver_silent_peer_times_out() {
    let (mut a, b) = Stream::pair().unwrap();
    let rx = spawn_receiver_with(b, small_target(), quick(300));
    // Connected, sends nothing.
    let (r, t) = rx.join().unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(e, MigrationError::Timeout(_, "the sender's Hello")),
        "{e}"
    );
    assert!(e.to_string().contains("Timed out after 300ms"), "{e}");
    assert!(t.restored.is_none());
    // The peer is told why.
    assert!(error_text(&last_words(&mut a)).contains("Timed out"));
}

#[test]
fn test_receiver_peer_stalling_mid_frame_after_hello_times_out() {
    let (mut a, b) = Stream::pair().unwrap();
    let rx = spawn_receiver_with(b, small_target(), quick(300));
    protocol::write_message(&mut a, &Message::Hello(Hello::ours())).unwrap();
    // Half of the Auth frame, then nothing.
    let auth = no_auth().encode();
    a.write_all(&auth[..auth.len() / 2]).unwrap();
    let (r, t) = rx.join().unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(e, MigrationError::Timeout(_, "the sender's Auth")),
        "{e}"
    );
    assert!(t.restored.is_none());
    let words = last_words(&mut a);
    assert!(matches!(words[0], Message::Hello(_)), "{words:?}");
    assert!(matches!(words[1], Message::Challenge { .. }), "{words:?}");
    assert!(
        error_text(&words).contains("the sender's Auth"),
        "{words:?}"
    );
}

#[test]
fn test_receiver_frame_timeout_is_per_frame_not_per_read() {
    // After a good handshake, a Pages frame trickles in one byte every
    // 50 ms: every read succeeds, yet the frame is late as a whole.
    let (mut a, b) = Stream::pair().unwrap();
    let target = small_target();
    let config = target.config.clone();
    let rx = spawn_receiver_with(b, target, quick(500));
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    protocol::write_message(&mut a, &Message::Hello(Hello::ours())).unwrap();
    assert!(matches!(
        protocol::read_message(&mut a).unwrap(),
        Message::Hello(_)
    ));
    assert!(matches!(
        protocol::read_message(&mut a).unwrap(),
        Message::Challenge { .. }
    ));
    protocol::write_message(&mut a, &no_auth()).unwrap();
    assert!(matches!(
        protocol::read_message(&mut a).unwrap(),
        Message::AuthOk { .. }
    ));
    protocol::write_message(&mut a, &Message::Config(config)).unwrap();
    assert_eq!(protocol::read_message(&mut a).unwrap(), Message::Accept);
    let frame = Message::Pages(one_page(0, 1, 9)).encode();
    let started = Instant::now();
    for byte in frame.iter().take(100) {
        if a.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let (r, t) = rx.join().unwrap();
    let e = r.unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Timeout(_, "the next Pages, State or Complete frame")
        ),
        "{e}"
    );
    // It gave up while bytes were still arriving (100 bytes take 5 s).
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(t.restored.is_none());
}

fn token(b: &[u8]) -> Option<Token> {
    Some(Token::from_bytes(b))
}

/// Migrates a small VM with these tokens on each side.
fn migrate_with_tokens(
    sender: Option<Token>,
    receiver: Option<Token>,
) -> (
    Result<SendReport>,
    Result<ReceiveReport>,
    FakeSource,
    FakeTarget,
    MigrationStatus,
) {
    let ranges = layout(4, 4);
    let mem = new_memory(&ranges);
    scatter(&mem, 40, 3);
    let mut source = FakeSource::new(mem);
    let (mut a, b) = Stream::pair().unwrap();
    let opts = ReceiveOptions {
        token: receiver,
        ..ReceiveOptions::with_timeout(Duration::from_secs(10))
    };
    let rx = spawn_receiver_with(b, FakeTarget::new(&ranges), opts);
    let status = MigrationStatus::new();
    let send_opts = SendOptions {
        token: sender,
        ..fast_opts()
    };
    let sent = send(&mut a, &mut source, &send_opts, &status);
    drop(a);
    let (received, target) = rx.join().unwrap();
    (sent, received, source, target, status)
}

#[test]
fn test_migration_with_the_same_token_on_both_sides_succeeds() {
    let t = token(b"correct horse battery staple");
    let (sent, received, source, target, _) = migrate_with_tokens(t.clone(), t);
    sent.unwrap();
    received.unwrap();
    assert_same_memory(&source.mem, &target.mem);
    assert!(target.ran);
}

/// Nothing moved: no page, no dirty tracking, the source never paused.
fn assert_nothing_moved(source: &FakeSource, target: &FakeTarget, status: &MigrationStatus) {
    assert_eq!(status.snapshot().pages_sent, 0);
    assert_eq!(status.snapshot().state, MigrationState::Failed);
    assert_eq!(source.fetches, 0);
    assert!(!source.tracking);
    assert!(!source.is_paused());
    assert!(target.restored.is_none());
    assert!(target.mem.iter().all(|r| MmapRegion::bitmap(r)
        .get_and_reset()
        .iter()
        .all(|&w| w == 0)));
}

#[test]
fn test_receiver_with_token_refuses_sender_without_or_with_wrong_token() {
    for (sender, why) in [
        (None, "the sender presented no migration token"),
        (
            token(b"correct horse battery stapler"),
            "the sender's migration token does not match",
        ),
    ] {
        let (sent, received, source, target, status) =
            migrate_with_tokens(sender, token(b"correct horse battery staple"));
        let e = sent.unwrap_err();
        assert!(
            matches!(&e, MigrationError::Refused(r) if r.contains(why)),
            "{e}"
        );
        let e = received.unwrap_err();
        assert!(
            matches!(&e, MigrationError::Unauthenticated(r) if r.contains(why)),
            "{e}"
        );
        assert_nothing_moved(&source, &target, &status);
    }
}

#[test]
fn test_sender_with_token_refuses_receiver_without_or_with_wrong_token() {
    for (receiver, why) in [
        (None, "the receiver has no migration token"),
        (token(b"correct horse battery stapler"), "does not match"),
    ] {
        let (sent, received, source, target, status) =
            migrate_with_tokens(token(b"correct horse battery staple"), receiver.clone());
        let e = sent.unwrap_err();
        if receiver.is_none() {
            assert!(
                matches!(&e, MigrationError::Unauthenticated(r) if r.contains(why)),
                "{e}"
            );
            // The receiver hears why and gives up.
            let e = received.unwrap_err();
            assert!(
                matches!(&e, MigrationError::Peer(r) if r.contains(why)),
                "{e}"
            );
        } else {
            // A receiver with another token refuses first.
            assert!(
                matches!(&e, MigrationError::Refused(r) if r.contains(why)),
                "{e}"
            );
            assert!(received.is_err());
        }
        assert_nothing_moved(&source, &target, &status);
    }
}

#[test]
fn test_token_never_crosses_the_wire_and_proof_is_fresh() {
    let secret = b"correct horse battery staple";
    let mut proofs = Vec::new();
    for _ in 0..2 {
        let (mut a, mut b) = Stream::pair().unwrap();
        let peer = thread::spawn(move || {
            // A receiver that records everything the sender writes.
            b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _hello = protocol::read_message(&mut b).unwrap();
            protocol::write_message(&mut b, &Message::Hello(Hello::ours())).unwrap();
            protocol::write_message(&mut b, &Message::Challenge { nonce: [1; 32] }).unwrap();
            let (_, raw) = protocol::read_frame(&mut b).unwrap();
            drop(b);
            raw
        });
        let mut source = FakeSource::new(new_memory(&layout(4, 4)));
        let opts = SendOptions {
            token: token(secret),
            ..fast_opts()
        };
        assert!(send(&mut a, &mut source, &opts, &MigrationStatus::new()).is_err());
        let raw = peer.join().unwrap();
        assert!(!raw.windows(secret.len()).any(|w| w == secret));
        let Ok(Message::Auth {
            nonce,
            proof: Some(p),
        }) = Message::decode(protocol::tag::AUTH, &raw)
        else {
            panic!("not an Auth with a proof")
        };
        assert!(Token::from_bytes(secret).verify_sender(&[1; 32], &nonce, &p));
        proofs.push(p);
    }
    // Same challenge, fresh sender nonce: a recorded proof is never reused.
    assert_ne!(proofs[0], proofs[1]);
}
