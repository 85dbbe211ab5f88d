//! What survives: graceful restarts, SIGKILL right after an ack, and the admin commands on the store.

use std::io::Write;
use std::process::{Command, Stdio};

use hearth_client_api::model::EventContent;
use hearth_client_api::{Client, ErrorCode, Target};
use hearth_tests::{ChildNode, PASSWORD, TestNode, hearth_bin};

#[tokio::test]
async fn a_restart_keeps_history_memberships_and_cursors() {
    let mut node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let group = alice
        .api
        .create_group("kept", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let mut a = alice.connect().await;
    a.send_in(&group.id, "before the restart").await;
    let mut b = bob.connect().await;
    let last = b
        .backlog
        .last()
        .and_then(|e| e.pos)
        .expect("bob has events");
    b.ack(last).await;
    a.send_in(&group.id, "unread by bob").await;
    b.message().await;
    b.close().await;
    a.close().await;

    node.restart().await;
    let alice = alice.on(&node);
    let bob = bob.on(&node);
    let history = alice
        .api
        .history(&group.id, None, None)
        .await
        .expect("history");
    assert_eq!(history.events.len(), 4, "create, add and two messages");
    let members = bob
        .api
        .members(&group.id)
        .await
        .expect("bob is still a member");
    assert_eq!(members.members.len(), 2);
    let b = bob.connect().await;
    assert_eq!(b.ready().cursor, last, "the acknowledged cursor survived");
    assert_eq!(b.backlog.len(), 1);
    assert!(
        matches!(&b.backlog[0].content, EventContent::Message { body } if body == "unread by bob")
    );
    // New positions continue after the old ones.
    let mut a = alice.connect().await;
    a.send_in(&group.id, "after the restart").await;
    let mut b = b;
    let e = b.event().await;
    assert!(e.pos.expect("pos") > b.backlog[0].pos.expect("pos"));
}

/// Sequence numbers of a channel's events, oldest first, as its history gives them.
async fn seqs_in(user: &hearth_tests::TestUser, channel: &str) -> Vec<u64> {
    let page = user
        .api
        .history(channel, None, Some(200))
        .await
        .expect("history");
    page.events.iter().rev().map(|e| e.seq).collect()
}

#[tokio::test]
async fn membership_and_sequences_between_writes_match_what_a_restart_reads_back() {
    let mut node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let group = alice
        .api
        .create_group("busy", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let mut a = alice.connect().await;
    let mut b = bob.connect().await;
    // Sends and membership changes on the same channels, one write after another.
    a.send_in(&group.id, "one").await;
    let (_, direct) = a.send_to("bob", "psst").await;
    b.send_in(&group.id, "two").await;
    alice
        .api
        .remove_member(&group.id, &bob.id)
        .await
        .expect("bob removed");
    let key = b.key();
    b.send_frame(&hearth_client_api::ClientFrame::send(
        key.clone(),
        Target::Channel(group.id.clone()),
        "still here?",
    ))
    .await;
    assert_eq!(b.error().await, (ErrorCode::NotMember, Some(key)));
    alice
        .api
        .add_member(&group.id, &carol.id)
        .await
        .expect("carol added");
    let mut c = carol.connect().await;
    c.send_in(&group.id, "three").await;
    a.send_to("bob", "again").await;
    let group_before = seqs_in(&alice, &group.id).await;
    let direct_before = seqs_in(&alice, &direct).await;
    assert_eq!(
        group_before,
        (0..group_before.len() as u64).collect::<Vec<_>>()
    );
    a.close().await;
    b.close().await;
    c.close().await;

    node.restart().await;
    let (alice, bob, carol) = (alice.on(&node), bob.on(&node), carol.on(&node));
    assert_eq!(seqs_in(&alice, &group.id).await, group_before);
    assert_eq!(seqs_in(&alice, &direct).await, direct_before);
    let mut members: Vec<String> = alice
        .api
        .members(&group.id)
        .await
        .expect("members")
        .members
        .into_iter()
        .map(|m| m.user)
        .collect();
    members.sort();
    assert_eq!(members, ["alice@localhost", "carol@localhost"]);
    // Sequences go on where they stood: no event is made twice at one place.
    let mut c = carol.connect().await;
    c.send_in(&group.id, "after").await;
    let mut b = bob.connect().await;
    b.send_to("alice", "back").await;
    let group_after = seqs_in(&alice, &group.id).await;
    assert_eq!(
        group_after,
        (0..group_before.len() as u64 + 1).collect::<Vec<_>>()
    );
    // A direct chat's history leaves out its two hidden membership events.
    let mut direct_expected = direct_before.clone();
    direct_expected.push(direct_before.last().expect("two messages") + 1);
    assert_eq!(seqs_in(&alice, &direct).await, direct_expected);
}

#[tokio::test]
async fn an_acknowledged_message_survives_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = ChildNode::start(hearth_bin!(), dir.path());
    let client = Client::new(&node.url()).expect("url");
    let alice = client
        .register("alice", PASSWORD, None)
        .await
        .expect("alice");
    client.register("bob", PASSWORD, None).await.expect("bob");
    let mut conn = client.connect_session(&alice.token).await.expect("session");
    let mut acked = Vec::new();
    for i in 0..50 {
        let key = format!("k{i}");
        conn.send_message(
            key.clone(),
            Target::User("bob@localhost".into()),
            format!("m{i}"),
        )
        .await
        .expect("send");
        acked.push(key);
    }
    // Wait for the last ack, then kill at once: no graceful shutdown, no final flush.
    let mut last_channel = String::new();
    let mut seen = 0;
    while seen < 50 {
        match conn.next_frame().await.expect("frame").expect("open") {
            hearth_client_api::ServerFrame::Ack { channel, .. } => {
                seen += 1;
                last_channel = channel;
            }
            hearth_client_api::ServerFrame::Error { code, message, .. } => {
                panic!("send refused: {code}: {message}")
            }
            _ => {}
        }
    }
    node.kill();

    let node = ChildNode::start(hearth_bin!(), dir.path());
    let client = Client::new(&node.url()).expect("url");
    let bob = client
        .login("bob", PASSWORD, None)
        .await
        .expect("bob logs in");
    let page = client
        .with_token(bob.token)
        .history(&last_channel, None, Some(100))
        .await
        .expect("history");
    let bodies: Vec<String> = page
        .events
        .iter()
        .rev()
        .filter_map(|e| match &e.content {
            EventContent::Message { body } => Some(body.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..50).map(|i| format!("m{i}")).collect();
    assert_eq!(
        bodies, expected,
        "every acknowledged message is there after SIGKILL"
    );
}

fn hearth(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(hearth_bin!())
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hearth");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("hearth exits");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn admin_commands_add_list_and_disable_users_in_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().to_str().expect("utf-8 path");
    let (ok, out, err) = hearth(
        &["user", "add", "carol", "--data-dir", data],
        "a long password\n",
    );
    assert!(ok, "user add failed: {err}");
    assert!(out.contains("created carol@localhost"));
    let (ok, _, err) = hearth(
        &["user", "add", "carol", "--data-dir", data],
        "a long password\n",
    );
    assert!(
        !ok && err.contains("taken"),
        "a second add is refused: {err}"
    );
    let (ok, out, _) = hearth(&["user", "list", "--data-dir", data], "");
    assert!(ok && out.contains("carol@localhost\tactive"));

    // While a node runs it owns the store; the commands go through its admin socket.
    let node = ChildNode::start(hearth_bin!(), dir.path());
    let socket = dir.path().join("admin.sock");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "only the node's user may use the socket"
        );
    }
    let (ok, out, err) = hearth(&["user", "list", "--data-dir", data], "");
    assert!(ok && out.contains("carol@localhost\tactive"), "{out} {err}");
    let (ok, out, err) = hearth(
        &["user", "add", "dave", "--data-dir", data],
        "another long password\n",
    );
    assert!(ok && out.contains("created dave@localhost"), "{out} {err}");
    let (ok, _, err) = hearth(
        &["user", "add", "dave", "--data-dir", data],
        "another long password\n",
    );
    assert!(
        !ok && err.contains("taken"),
        "a second add is refused: {err}"
    );
    let client = Client::new(&node.url()).expect("url");
    client
        .login("dave", "another long password", None)
        .await
        .expect("dave, added while the node runs, logs in at once");
    let session = client
        .login("carol", "a long password", None)
        .await
        .expect("carol logs in");
    let (ok, out, err) = hearth(&["user", "disable", "carol", "--data-dir", data], "");
    assert!(
        ok && out.contains("disabled carol@localhost"),
        "{out} {err}"
    );
    let err = client
        .login("carol", "a long password", None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AccountDisabled));
    let err = client.with_token(session.token).me().await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Unauthorized),
        "her tokens were revoked on the running node"
    );

    // A killed node leaves its socket behind; the commands see nobody answers and
    // open the store themselves, and the next node replaces the socket.
    node.kill();
    assert!(socket.exists());
    let (ok, out, err) = hearth(&["user", "list", "--data-dir", data], "");
    assert!(ok, "list after a crash: {err}");
    assert!(out.contains("carol@localhost\tdisabled") && out.contains("dave@localhost\tactive"));
    let _node = ChildNode::start(hearth_bin!(), dir.path());
    let (ok, out, err) = hearth(&["user", "list", "--data-dir", data], "");
    assert!(ok && out.contains("dave@localhost\tactive"), "{out} {err}");
}

#[tokio::test]
async fn a_new_data_folder_is_private_to_the_nodes_user() {
    use std::os::unix::fs::PermissionsExt;
    let parent = tempfile::tempdir().expect("temp dir");
    let data_dir = parent.path().join("org").join("hearth-data");
    let node = TestNode::start_with({
        let data_dir = data_dir.clone();
        move |c| c.data_dir = data_dir
    })
    .await;
    node.user("alice").await;
    for dir in [&data_dir, &parent.path().join("org")] {
        let mode = std::fs::metadata(dir).expect("folder").permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "{} is {:o}",
            dir.display(),
            mode & 0o777
        );
    }
}
