//! One node, real sockets, real store: accounts, direct chat, groups, sync, devices, history.

use std::collections::HashSet;

use hearth_client_api::model::{EventContent, MembershipAction};
use hearth_client_api::{ClientError, ErrorCode, Target};
use hearth_tests::{PASSWORD, TestNode, eventually};

fn server_code(e: ClientError) -> ErrorCode {
    e.code()
        .unwrap_or_else(|| panic!("expected a server error code, got {e}"))
}

#[tokio::test]
async fn register_login_and_refusals() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    assert_eq!(alice.id, "alice@localhost");
    let me = alice.api.me().await.expect("me");
    assert_eq!(me.user, "alice@localhost");

    let c = node.client();
    let second = c
        .login("alice", PASSWORD, Some("phone"))
        .await
        .expect("login");
    assert_ne!(second.device, me.device, "each login is its own device");
    assert!(second.token.len() >= 43, "tokens carry at least 256 bits");

    let wrong = c
        .login("alice", "not the password", None)
        .await
        .unwrap_err();
    assert_eq!(server_code(wrong), ErrorCode::BadCredentials);
    let nobody = c.login("nobody", PASSWORD, None).await.unwrap_err();
    assert_eq!(server_code(nobody), ErrorCode::BadCredentials);
    let taken = c.register("alice", PASSWORD, None).await.unwrap_err();
    assert_eq!(server_code(taken), ErrorCode::UserExists);
    let bad_name = c.register("Alice!", PASSWORD, None).await.unwrap_err();
    assert_eq!(server_code(bad_name), ErrorCode::InvalidField);
    let short = c.register("bob", "short", None).await.unwrap_err();
    assert_eq!(server_code(short), ErrorCode::InvalidField);

    let devices = alice.api.devices().await.expect("devices").devices;
    assert_eq!(devices.len(), 2);
    assert_eq!(devices.iter().filter(|d| d.current).count(), 1);
}

#[tokio::test]
async fn closed_registration_refuses_strangers() {
    let node =
        TestNode::start_with(|c| c.registration = hearth_node::config::Registration::Closed).await;
    let err = node
        .client()
        .register("eve", PASSWORD, None)
        .await
        .unwrap_err();
    assert_eq!(server_code(err), ErrorCode::RegistrationClosed);
}

#[tokio::test]
async fn direct_message_reaches_an_online_recipient() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let mut b = bob.connect().await;

    let (event_id, channel) = a.send_to("bob@localhost", "hello bob").await;
    let got = b.event().await;
    assert_eq!(got.id, event_id);
    assert_eq!(got.channel, channel);
    assert_eq!(got.sender, "alice@localhost");
    assert_eq!(
        got.content,
        EventContent::Message {
            body: "hello bob".into()
        }
    );
    assert!(got.pos.is_some());

    // The reply goes to the same, single direct channel.
    let (_, reply_channel) = b.send_to("alice", "hi alice").await;
    assert_eq!(reply_channel, channel);
    // Alice's own device sees her message in its stream, then Bob's reply.
    assert_eq!(
        a.message().await,
        ("alice@localhost".into(), "hello bob".into())
    );
    assert_eq!(
        a.message().await,
        ("bob@localhost".into(), "hi alice".into())
    );
    let channels = alice.api.channels().await.expect("channels").channels;
    assert_eq!(channels.len(), 1);
    assert_eq!(channels[0].name, "bob@localhost");
}

#[tokio::test]
async fn offline_recipient_gets_everything_on_reconnect_in_order() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    for i in 0..25 {
        a.send_to("bob@localhost", &format!("m{i}")).await;
    }
    let b = bob.connect().await;
    let bodies: Vec<String> = b
        .backlog
        .iter()
        .map(|e| match &e.content {
            EventContent::Message { body } => body.clone(),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    let expected: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, expected);
    let positions: Vec<u64> = b.backlog.iter().map(|e| e.pos.expect("pos")).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "stream positions increase"
    );
}

#[tokio::test]
async fn cursor_acknowledgement_means_reconnects_start_after_it() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    for i in 0..5 {
        a.send_to("bob", &format!("m{i}")).await;
    }
    let mut b = bob.connect().await;
    assert_eq!(b.backlog.len(), 5);
    let third = b.backlog[2].pos.expect("pos");
    b.ack(third).await;
    // Acks are not answered; a heartbeat round trip is not needed either: close and
    // reconnect, the server processes frames in order.
    b.close().await;
    let b = bob.connect().await;
    assert_eq!(b.ready().cursor, third);
    assert_eq!(b.backlog.len(), 2, "only what came after the cursor");
}

#[tokio::test]
async fn every_device_sees_everything_including_its_siblings_messages() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let alice_phone = node.login(&alice).await;
    let bob = node.user("bob").await;
    let mut laptop = alice.connect().await;
    let mut phone = alice_phone.connect().await;
    let mut b = bob.connect().await;

    b.send_to("alice", "to both of your devices").await;
    assert_eq!(laptop.message().await.1, "to both of your devices");
    assert_eq!(phone.message().await.1, "to both of your devices");

    laptop.send_to("bob", "sent from the laptop").await;
    assert_eq!(
        phone.message().await,
        ("alice@localhost".into(), "sent from the laptop".into())
    );
    assert_eq!(
        b.message().await.1,
        "to both of your devices",
        "bob's own message first"
    );
    assert_eq!(b.message().await.1, "sent from the laptop");
    // The sending device gets its own event in its stream too.
    assert_eq!(laptop.message().await.1, "sent from the laptop");
}

#[tokio::test]
async fn a_hundred_member_group_fans_out_and_refuses_the_hundred_and_first() {
    let node = TestNode::start().await;
    let owner = node.user("owner").await;
    let mut users = Vec::new();
    for i in 0..100 {
        users.push(node.user(&format!("u{i}")).await);
    }
    let first_99: Vec<String> = users[..99].iter().map(|u| u.id.clone()).collect();
    let group = owner
        .api
        .create_group("everyone", &first_99)
        .await
        .expect("create group");
    assert_eq!(group.member_count, 100);

    let err = owner
        .api
        .add_member(&group.id, &users[99].id)
        .await
        .unwrap_err();
    assert_eq!(server_code(err), ErrorCode::GroupFull);
    let too_many: Vec<String> = users.iter().map(|u| u.id.clone()).collect();
    let err = owner
        .api
        .create_group("too big", &too_many)
        .await
        .unwrap_err();
    assert_eq!(server_code(err), ErrorCode::GroupFull);

    let mut devices = Vec::new();
    for u in &users[..99] {
        devices.push(u.connect().await);
    }
    let mut o = owner.connect().await;
    let (event_id, _) = o.send_in(&group.id, "hello everyone").await;
    for d in &mut devices {
        let (_, body) = d.message().await;
        assert_eq!(body, "hello everyone");
    }
    let history = owner
        .api
        .history(&group.id, None, Some(1))
        .await
        .expect("history");
    assert_eq!(history.events[0].id, event_id);
}

#[tokio::test]
async fn membership_changes_are_events_and_only_admins_make_them() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let group = alice
        .api
        .create_group("team", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let mut b = bob.connect().await;
    let kinds: Vec<MembershipAction> = b
        .backlog
        .iter()
        .filter_map(|e| match e.content {
            EventContent::Membership { action, .. } => Some(action),
            _ => None,
        })
        .collect();
    // An event reaches the members after it (and whoever it removed): Bob hears of
    // his own addition, not of the creation before it.
    assert_eq!(kinds, vec![MembershipAction::Add]);

    let err = bob.api.add_member(&group.id, &carol.id).await.unwrap_err();
    assert_eq!(server_code(err), ErrorCode::NotChannelAdmin);
    alice
        .api
        .add_member(&group.id, &carol.id)
        .await
        .expect("admin adds");
    let added = b.event().await;
    assert!(matches!(
        added.content,
        EventContent::Membership { action: MembershipAction::Add, ref user, .. } if user == "carol@localhost"
    ));

    alice
        .api
        .remove_member(&group.id, &carol.id)
        .await
        .expect("admin removes");
    let removed = b.event().await;
    assert!(matches!(
        removed.content,
        EventContent::Membership {
            action: MembershipAction::Remove,
            ..
        }
    ));
    bob.api.leave(&group.id).await.expect("bob leaves");
    let members = alice.api.members(&group.id).await.expect("members");
    assert_eq!(members.members.len(), 1);
    assert!(members.version >= 4);
}

#[tokio::test]
async fn non_members_can_neither_read_nor_send() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mallory = node.user("mallory").await;
    let group = alice
        .api
        .create_group("private", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let mut a = alice.connect().await;
    let (_, direct) = a.send_to("bob", "secret").await;

    for channel in [&group.id, &direct] {
        let err = mallory.api.history(channel, None, None).await.unwrap_err();
        assert_eq!(server_code(err), ErrorCode::NotMember);
        let err = mallory.api.members(channel).await.unwrap_err();
        assert_eq!(server_code(err), ErrorCode::NotMember);
    }
    let mut m = mallory.connect().await;
    let key = m.key();
    m.send_frame(&hearth_client_api::ClientFrame::send(
        key.clone(),
        Target::Channel(group.id.clone()),
        "let me in",
    ))
    .await;
    assert_eq!(m.error().await, (ErrorCode::NotMember, Some(key)));
    let history = alice
        .api
        .history(&group.id, None, None)
        .await
        .expect("history");
    assert!(
        history
            .events
            .iter()
            .all(|e| e.sender != "mallory@localhost")
    );
}

#[tokio::test]
async fn a_resend_with_the_same_key_is_acknowledged_but_never_delivered_twice() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let first = a
        .send_keyed("same-key", Target::User(bob.id.clone()), "once")
        .await;
    let again = a
        .send_keyed("same-key", Target::User(bob.id.clone()), "once")
        .await;
    assert_eq!(first, again);
    // And from another device of the same user, after a reconnect.
    a.close().await;
    let mut a = alice.connect().await;
    let third = a
        .send_keyed("same-key", Target::User(bob.id.clone()), "once")
        .await;
    assert_eq!(first, third);
    let b = bob.connect().await;
    assert_eq!(b.backlog.len(), 1, "delivered exactly once");
    let history = bob
        .api
        .history(&first.1, None, None)
        .await
        .expect("history");
    assert_eq!(history.events.len(), 1, "stored exactly once");
}

#[tokio::test]
async fn a_key_is_forgotten_after_its_retention_and_a_resend_then_is_a_new_message() {
    let node = TestNode::start_with(|c| c.idempotency_retention_secs = 2).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let to_bob = || Target::User(bob.id.clone());
    let first = a.send_keyed("old-key", to_bob(), "first try").await;
    assert_eq!(a.send_keyed("old-key", to_bob(), "first try").await, first);

    let store = node.services().store.clone();
    let alice_id = alice.id.clone();
    eventually("the old key's record is swept away", || {
        let forgotten = store.ack(&alice_id, "old-key").map(|r| r.is_none());
        async move { forgotten.unwrap_or(false) }
    })
    .await;
    let late = a
        .send_keyed("old-key", to_bob(), "a resend days later")
        .await;
    assert_ne!(late.0, first.0, "a forgotten key makes a new message");
    // Keys younger than the retention still answer with their first ack.
    let fresh = a.send_keyed("new-key", to_bob(), "fresh").await;
    assert_eq!(a.send_keyed("new-key", to_bob(), "fresh").await, fresh);

    let history = bob
        .api
        .history(&first.1, None, None)
        .await
        .expect("history");
    let bodies: Vec<_> = history
        .events
        .iter()
        .rev()
        .map(|e| match &e.content {
            EventContent::Message { body } => body.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(bodies, ["first try", "a resend days later", "fresh"]);
}

#[tokio::test]
async fn history_pages_newest_first_and_is_the_same_for_every_reader() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let group = alice
        .api
        .create_group("log", std::slice::from_ref(&bob.id))
        .await
        .expect("group");
    let mut a = alice.connect().await;
    let mut b = bob.connect().await;
    for i in 0..30 {
        if i % 2 == 0 {
            a.send_in(&group.id, &format!("m{i}")).await;
        } else {
            b.send_in(&group.id, &format!("m{i}")).await;
        }
    }
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = alice
            .api
            .history(&group.id, before.as_deref(), Some(7))
            .await
            .expect("page");
        seen.extend(page.events.iter().map(|e| e.id.clone()));
        match page.next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event on two pages");
    assert_eq!(seen.len(), 32, "30 messages and the create and add events");
    let all_bob = bob
        .api
        .history(&group.id, None, Some(100))
        .await
        .expect("history");
    let ids_bob: Vec<String> = all_bob.events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids_bob, seen, "every reader sees one order");
    let bodies: Vec<String> = all_bob
        .events
        .iter()
        .filter_map(|e| match &e.content {
            EventContent::Message { body } => Some(body.clone()),
            _ => None,
        })
        .collect();
    let expected: Vec<String> = (0..30).rev().map(|i| format!("m{i}")).collect();
    assert_eq!(
        bodies, expected,
        "newest first, in the order they were sent"
    );
}

#[tokio::test]
async fn ten_thousand_missed_messages_arrive_in_batches() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    let (_, channel) = a.send_to("bob", "first").await;
    // Pipeline the sends, then collect the acks.
    let mut keys = Vec::new();
    for i in 1..10_000 {
        let key = format!("bulk-{i}");
        a.send_frame(&hearth_client_api::ClientFrame::send(
            key.clone(),
            Target::Channel(channel.clone()),
            format!("m{i}"),
        ))
        .await;
        keys.push(key);
        if keys.len() == 200 {
            for k in keys.drain(..) {
                a.wait_for(|f| match f {
                    hearth_client_api::ServerFrame::Ack { key, .. } if *key == k => Some(()),
                    _ => None,
                })
                .await;
            }
        }
    }
    for k in keys.drain(..) {
        a.wait_for(|f| match f {
            hearth_client_api::ServerFrame::Ack { key, .. } if *key == k => Some(()),
            _ => None,
        })
        .await;
    }
    let conn = tokio::time::timeout(hearth_tests::WAIT, bob.api.connect_session())
        .await
        .expect("in time")
        .expect("connect");
    let mut conn = conn;
    let mut batches = 0;
    let mut events = Vec::new();
    loop {
        match conn.next_frame().await.expect("frame").expect("open") {
            hearth_client_api::ServerFrame::Sync {
                events: batch,
                more,
            } => {
                assert!(batch.len() <= 500, "no giant frame: {} events", batch.len());
                batches += 1;
                events.extend(batch);
                if !more {
                    break;
                }
            }
            _ => continue,
        }
    }
    assert_eq!(events.len(), 10_000);
    assert!(batches >= 20);
    let unique: HashSet<_> = events.iter().map(|e| e.id.clone()).collect();
    assert_eq!(unique.len(), 10_000);
}

#[tokio::test]
async fn a_backlog_of_large_messages_arrives_in_frames_within_the_limit() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let carol = node.user("carol").await;
    let mut a = alice.connect().await;
    let big = "x".repeat(16 * 1024 - 100);
    for _ in 0..12 {
        a.send_to("carol", &big).await;
    }
    let c = carol.connect().await;
    assert_eq!(c.backlog.len(), 12, "every large message arrives");
    // A new device of the sender catches up too.
    let fresh = node.login(&alice).await.connect().await;
    assert_eq!(fresh.backlog.len(), 12);
}

#[tokio::test]
async fn a_refused_registration_leaves_no_account_behind() {
    let node = TestNode::start().await;
    let c = node.client();
    let err = c
        .register("dora", PASSWORD, Some(&"d".repeat(65)))
        .await
        .unwrap_err();
    assert_eq!(server_code(err), ErrorCode::InvalidField);
    c.register("dora", PASSWORD, Some("laptop"))
        .await
        .expect("the name is still free");
}

#[tokio::test]
async fn a_direct_chat_pages_exactly_without_its_hidden_events() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    node.user("bob").await;
    let mut a = alice.connect().await;
    let mut channel = String::new();
    for i in 0..4 {
        channel = a.send_to("bob", &format!("m{i}")).await.1;
    }
    let page = alice
        .api
        .history(&channel, None, Some(4))
        .await
        .expect("history");
    assert_eq!(page.events.len(), 4);
    assert_eq!(page.next, None, "no empty page after the last");
    let first = alice
        .api
        .history(&channel, None, Some(3))
        .await
        .expect("history");
    let next = first.next.expect("an older page exists");
    let rest = alice
        .api
        .history(&channel, Some(&next), Some(3))
        .await
        .expect("older");
    assert_eq!(rest.events.len(), 1);
    assert_eq!(rest.next, None);
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let node = TestNode::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", node.addr))
        .await
        .expect("connect");
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    })))
    .await
    .expect("close");
    let reply = tokio::time::timeout(hearth_tests::WAIT, ws.next())
        .await
        .expect("an answer in time");
    assert!(
        matches!(reply, Some(Ok(Message::Close(Some(ref f)))) if f.code == CloseCode::Normal),
        "expected a close frame back, got {reply:?}"
    );
}
