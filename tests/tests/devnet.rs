//! `hearth devnet` as a tester runs it: N nodes on loopback with demo users, one network, stopped by a signal.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use hearth_client_api::Client;
use hearth_tests::{WAIT, hearth_bin};

#[tokio::test]
async fn devnet_starts_a_network_with_demo_users_and_stops_on_a_signal() {
    let mut child = Command::new(hearth_bin!())
        .args(["devnet", "--nodes", "3"])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start devnet");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut urls = Vec::new();
    let mut printed = String::new();
    while !printed.contains("Ctrl-C stops every node") {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("devnet prints its nodes");
        if let Some(url) = line
            .split_whitespace()
            .find(|w| w.starts_with("http://127."))
        {
            urls.push(url.to_string());
        }
        printed.push_str(&line);
        printed.push('\n');
    }
    assert_eq!(urls.len(), 3, "one address per node:\n{printed}");
    assert!(printed.contains("alice@node2.devnet"), "{printed}");

    let one = Client::new(&urls[0]).expect("url");
    let two = Client::new(&urls[1]).expect("url");
    let alice = one
        .login("alice", "devnet-password", None)
        .await
        .expect("demo user on node1");
    let bob = two
        .login("bob", "devnet-password", None)
        .await
        .expect("demo user on node2");
    let mut bob_session = two.connect_session(&bob.token).await.expect("bob connects");
    let mut alice_session = one
        .connect_session(&alice.token)
        .await
        .expect("alice connects");
    alice_session
        .send_message(
            "k1",
            hearth_client_api::Target::User("bob@node2.devnet".into()),
            "across the devnet",
        )
        .await
        .expect("send");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(hearth_client_api::ServerFrame::Event { event }) =
                bob_session.next_frame().await.expect("frame")
            {
                return event;
            }
        }
    })
    .await
    .expect("bob gets it");
    assert_eq!(got.sender, "alice@node1.devnet");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut rest = String::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) {
        rest.push_str(&line);
        rest.push('\n');
        if line == "stopped" {
            break;
        }
    }
    assert!(rest.contains("stopped"), "devnet stops cleanly: {rest}");
    let exit = child.wait().expect("exit");
    assert!(exit.success());
}
