//! Several nodes on loopback as one network: cross-server chat, groups across three
//! servers, outages and peer-assisted catch-up, discovery through a peer, forged
//! events, pinned keys, and presence across servers.

use std::collections::BTreeSet;

use hearth_client_api::ServerFrame;
use hearth_client_api::model::{EventContent, PresenceStatus};
use hearth_federation::SignedEvent;
use hearth_federation::event::{EVENT_VERSION, EventContent as FedContent};
use hearth_federation::protocol::FedResponse;
use hearth_tests::{TestNode, eventually};

fn bodies(events: &[hearth_client_api::model::Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.content {
            EventContent::Message { body } => Some(body.clone()),
            _ => None,
        })
        .collect()
}

async fn pair() -> (TestNode, TestNode) {
    let a = TestNode::server("a.test", &[]).await;
    let b = TestNode::server("b.test", &a.federation_addrs().await).await;
    (a, b)
}

#[tokio::test]
async fn direct_chat_works_across_servers_both_ways() {
    let (a, b) = pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let mut al = alice.connect().await;
    let mut bo = bob.connect().await;

    let (id, channel) = al.send_to("bob@b.test", "hello from a").await;
    let got = bo.event().await;
    assert_eq!(
        (got.id.as_str(), got.channel.as_str()),
        (id.as_str(), channel.as_str())
    );
    assert_eq!(got.sender, "alice@a.test");
    assert_eq!(got.origin, "a.test");

    let (_, reply_channel) = bo.send_to("alice@a.test", "hello from b").await;
    assert_eq!(
        reply_channel, channel,
        "one direct channel for the pair, on both servers"
    );
    assert_eq!(al.message().await.1, "hello from a");
    assert_eq!(
        al.message().await,
        ("bob@b.test".into(), "hello from b".into())
    );

    let on_a = alice
        .api
        .history(&channel, None, None)
        .await
        .expect("history on a");
    let on_b = bob
        .api
        .history(&channel, None, None)
        .await
        .expect("history on b");
    let ids = |p: &hearth_client_api::http::HistoryPage| {
        p.events.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    };
    assert_eq!(ids(&on_a), ids(&on_b), "same history on both servers");
    assert_eq!(bodies(&on_a.events), vec!["hello from b", "hello from a"]);

    // Each server counts the pushes the other answered (just after the answer, so
    // perhaps after the message was shown) and the events in them.
    for node in [&a, &b] {
        eventually("the push is counted", || {
            let pushes = node.metric("hearth_federation_pushes_total");
            let events = node.metric("hearth_federation_events_out_total");
            async move { pushes >= 1.0 && events >= 1.0 }
        })
        .await;
    }
}

#[tokio::test]
async fn a_group_across_three_servers_delivers_once_to_every_device_in_one_order() {
    let a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let b = TestNode::server("b.test", &a_addr).await;
    let mut c_boot = a_addr.clone();
    c_boot.extend(b.federation_addrs().await);
    let c = TestNode::server("c.test", &c_boot).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let bob_phone = b.login(&bob).await;
    let carol = c.user("carol").await;
    let group = alice
        .api
        .create_group(
            "three servers",
            &["bob@b.test".into(), "carol@c.test".into()],
        )
        .await
        .expect("group");
    assert_eq!(group.member_count, 3);

    let mut devices = [
        alice.connect().await,
        bob.connect().await,
        bob_phone.connect().await,
        carol.connect().await,
    ];
    // Wait until the group is known on every server before the others send.
    for (node, user) in [(&b, &bob), (&c, &carol)] {
        let channel = group.id.clone();
        let api = user.api.clone();
        eventually("the group reached the other servers", || {
            let api = api.clone();
            let channel = channel.clone();
            async move { api.channel(&channel).await.is_ok() }
        })
        .await;
        let _ = node;
    }
    let senders = [0usize, 1, 3];
    let mut sent = Vec::new();
    for round in 0..3 {
        for &s in &senders {
            let body = format!("round {round} from device {s}");
            devices[s].send_in(&group.id, &body).await;
            sent.push(body);
        }
    }
    for d in devices.iter_mut() {
        let mut got = Vec::new();
        while got.len() < sent.len() {
            got.push(d.message().await.1);
        }
        let unique: BTreeSet<_> = got.iter().collect();
        assert_eq!(
            unique.len(),
            sent.len(),
            "each message exactly once per device"
        );
    }
    let history = |user: &hearth_tests::TestUser| {
        let api = user.api.clone();
        let channel = group.id.clone();
        async move {
            api.history(&channel, None, Some(100))
                .await
                .expect("history")
                .events
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        }
    };
    let on_a = history(&alice).await;
    eventually("the same history on all three servers", || {
        let (h_b, h_c, want) = (history(&bob), history(&carol), on_a.clone());
        async move { h_b.await == want && h_c.await == want }
    })
    .await;
}

#[tokio::test]
async fn a_server_that_was_down_catches_up_even_from_a_peer_when_the_origin_is_down_too() {
    let mut a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let b = TestNode::server("b.test", &a_addr).await;
    let b_addr = b.federation_addrs().await;
    let mut c_boot = a_addr.clone();
    c_boot.extend(b_addr.clone());
    let mut c = TestNode::server("c.test", &c_boot).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = c.user("carol").await;
    let group = alice
        .api
        .create_group("resilient", &["bob@b.test".into(), "carol@c.test".into()])
        .await
        .expect("group");
    {
        let api = carol.api.clone();
        let channel = group.id.clone();
        eventually("carol's server knows the group", || {
            let api = api.clone();
            let channel = channel.clone();
            async move { api.channel(&channel).await.is_ok() }
        })
        .await;
    }

    // C goes down; A and B go on talking.
    c.stop().await;
    let mut al = alice.connect().await;
    let mut bo = bob.connect().await;
    for i in 0..5 {
        al.send_in(&group.id, &format!("a{i}")).await;
        bo.send_in(&group.id, &format!("b{i}")).await;
    }
    c.restart_with_bootstrap(&c_boot).await;
    let carol = carol.on(&c);
    eventually("C has everything after it returns", || {
        let api = carol.api.clone();
        let channel = group.id.clone();
        async move {
            let page = api.history(&channel, None, Some(100)).await;
            page.map(|p| bodies(&p.events).len() == 10).unwrap_or(false)
        }
    })
    .await;

    // Now the peer-assisted case: C down again, A and B talk, then A goes down.
    c.stop().await;
    for i in 5..8 {
        al.send_in(&group.id, &format!("a{i}")).await;
        bo.send_in(&group.id, &format!("b{i}")).await;
    }
    // B holds A's messages before A goes away.
    {
        let api = bob.api.clone();
        let channel = group.id.clone();
        eventually("B holds A's latest messages", || {
            let api = api.clone();
            let channel = channel.clone();
            async move {
                api.history(&channel, None, Some(100))
                    .await
                    .map(|p| bodies(&p.events).contains(&"a7".to_string()))
                    .unwrap_or(false)
            }
        })
        .await;
    }
    al.close().await;
    a.stop().await;
    c.restart_with_bootstrap(&b_addr).await;
    let carol = carol.on(&c);
    eventually("C gets A's messages from B while A is down", || {
        let api = carol.api.clone();
        let channel = group.id.clone();
        async move {
            api.history(&channel, None, Some(100))
                .await
                .map(|p| {
                    let b = bodies(&p.events);
                    ["a5", "a6", "a7", "b5", "b6", "b7"]
                        .iter()
                        .all(|m| b.contains(&m.to_string()))
                })
                .unwrap_or(false)
        }
    })
    .await;
    let d = carol.connect().await;
    let all = bodies(&d.backlog);
    let unique: BTreeSet<_> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "nothing twice in carol's stream");
    assert_eq!(all.len(), 16);
}

#[tokio::test]
async fn a_node_that_knows_one_peer_reaches_a_third_through_it() {
    let hub = TestNode::server("hub.test", &[]).await;
    let hub_addr = hub.federation_addrs().await;
    let a = TestNode::server("a.test", &hub_addr).await;
    let c = TestNode::server("c.test", &hub_addr).await;
    let alice = a.user("alice").await;
    let carol = c.user("carol").await;
    let mut ca = carol.connect().await;
    let mut al = alice.connect().await;
    al.send_to("carol@c.test", "through the hub").await;
    assert_eq!(
        ca.message().await,
        ("alice@a.test".into(), "through the hub".into())
    );
    ca.send_to("alice@a.test", "and back").await;
    assert_eq!(al.message().await.1, "through the hub");
    assert_eq!(al.message().await.1, "and back");
}

#[tokio::test]
async fn forged_and_altered_events_are_refused_and_never_shown() {
    let a = TestNode::server("a.test", &[]).await;
    let rogue = TestNode::server("rogue.test", &a.federation_addrs().await).await;
    let alice = a.user("alice").await;
    let mallory = rogue.user("mallory").await;
    // A genuine conversation first, so the rogue knows a real channel.
    let mut ma = mallory.connect().await;
    let mut al = alice.connect().await;
    let (_, channel) = ma.send_to("alice@a.test", "hi, I am real").await;
    assert_eq!(al.message().await.1, "hi, I am real");
    let genuine = alice
        .api
        .history(&channel, None, None)
        .await
        .expect("history")
        .events;
    let rogue_fed = rogue.services().federation.clone().expect("federation");
    let refused_before = a.metric("hearth_federation_refused_total");

    let base = SignedEvent {
        v: EVENT_VERSION,
        channel: channel.clone(),
        origin: "rogue.test".into(),
        sender: "mallory@rogue.test".into(),
        seq: 1000,
        ts: hearth_federation::clock::wall_ms(),
        mver: 2,
        content: FedContent::Message {
            body: "forged".into(),
        },
        signatures: Default::default(),
    };
    // Claims to come from a user of a.test.
    let impersonation = SignedEvent {
        sender: "alice@a.test".into(),
        ..base.clone()
    };
    // Into a group the rogue has no member in.
    let intrusion = SignedEvent {
        channel: "nosuchchannel@a.test".into(),
        seq: 0,
        ..base.clone()
    };
    let valid = rogue_fed.sign_raw(base.clone()).expect("signs");
    let altered = valid.replace("\"forged\"", "\"altered in transit\"");
    let pretends_to_be_a = SignedEvent {
        origin: "a.test".into(),
        sender: "alice@a.test".into(),
        ..base.clone()
    };
    let events = vec![
        rogue_fed.sign_raw(impersonation).expect("signs"),
        rogue_fed.sign_raw(intrusion).expect("signs"),
        altered,
        rogue_fed.sign_raw(pretends_to_be_a).expect("signs"),
        "{\"not\":\"an event\"}".to_string(),
    ];
    let FedResponse::Pushed { accepted, refused } = rogue_fed
        .push_raw("a.test", events)
        .await
        .expect("a answers")
    else {
        panic!("unexpected answer");
    };
    assert_eq!(accepted, 0, "nothing forged is taken in: {refused:?}");
    assert_eq!(refused.len(), 5);
    assert!(a.metric("hearth_federation_refused_total") >= refused_before + 4.0);
    let after = alice
        .api
        .history(&channel, None, None)
        .await
        .expect("history")
        .events;
    assert_eq!(after, genuine, "nothing refused is stored");
    // Nor delivered: the next thing alice's device sees is a genuine message.
    ma.send_to("alice@a.test", "still real").await;
    assert_eq!(al.message().await.1, "still real");
}

#[tokio::test]
async fn a_server_that_changes_its_key_is_refused() {
    let a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let mut g = TestNode::server("globex.test", &a_addr).await;
    let alice = a.user("alice").await;
    let gary = g.user("gary").await;
    let mut ga = gary.connect().await;
    let mut al = alice.connect().await;
    ga.send_to("alice@a.test", "before the key change").await;
    assert_eq!(al.message().await.1, "before the key change");
    ga.close().await;

    // The same name comes back with another key.
    g.stop().await;
    std::fs::remove_file(g.data_dir().join("node.key")).expect("remove key");
    let refused_before = a.metric("hearth_federation_refused_total");
    g.restart_with_bootstrap(&a_addr).await;
    eventually("a refuses the new key", || {
        let refused = a.metric("hearth_federation_refused_total");
        async move { refused > refused_before }
    })
    .await;
    let gary = gary.on(&g);
    let mut ga = gary.connect().await;
    ga.send_to("alice@a.test", "after the key change").await;
    // Give the impostor's outbox time to try; nothing may arrive.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let channels = alice.api.channels().await.expect("channels").channels;
    let last = channels[0].last_event.as_ref().expect("last event");
    assert!(
        matches!(&last.content, EventContent::Message { body } if body == "before the key change")
    );
}

/// alice on `a` writes to bob on `b`; both users, and alice's device, once b holds
/// their direct chat.
async fn alice_writes_to_bob(
    a: &TestNode,
    b: &TestNode,
) -> (
    hearth_tests::TestUser,
    hearth_tests::TestUser,
    hearth_tests::Device,
) {
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let mut al = alice.connect().await;
    al.send_to("bob@b.test", "are you there?").await;
    let api = bob.api.clone();
    eventually("the direct chat reached b", || {
        let api = api.clone();
        async move {
            api.channels()
                .await
                .map(|c| !c.channels.is_empty())
                .unwrap_or(false)
        }
    })
    .await;
    (alice, bob, al)
}

/// Picks a presence frame saying bob@b.test has `status`.
fn bob_is(status: PresenceStatus) -> impl FnMut(&ServerFrame) -> Option<()> {
    move |f| match f {
        ServerFrame::Presence(p) if p.user == "bob@b.test" && p.status == status => Some(()),
        _ => None,
    }
}

#[tokio::test]
async fn presence_crosses_servers_and_times_out_there_too() {
    let a = TestNode::server("a.test", &[]).await;
    let b = TestNode::start_with({
        let addr = a.federation_addrs().await;
        move |c| {
            hearth_tests::federated(c, "b.test", addr);
            c.heartbeat_timeout_secs = 1;
        }
    })
    .await;
    let (alice, bob, mut al) = alice_writes_to_bob(&a, &b).await;
    let mut bo = bob.connect().await;
    al.wait_for(bob_is(PresenceStatus::Online)).await;
    // Bob's device falls silent; b times it out and a hears of it.
    let (_, code) = tokio::join!(al.wait_for(bob_is(PresenceStatus::Offline)), bo.closed());
    assert_eq!(code, hearth_client_api::close::HEARTBEAT_TIMEOUT);
    let looked_up = alice.api.presence(["bob@b.test"]).await.expect("presence");
    assert_eq!(looked_up.presence[0].status, PresenceStatus::Offline);
}

#[tokio::test]
async fn a_remote_user_whose_server_falls_silent_is_pushed_as_offline_and_online_again_when_it_speaks()
 {
    // a forgets an "online" after 3 of its refresh periods (3 s); b announces changes
    // but would refresh only hourly, so to a it looks like a server that went quiet.
    let a = TestNode::start_with(|c| {
        hearth_tests::federated(c, "a.test", Vec::new());
        c.presence_refresh_secs = 1;
    })
    .await;
    let b = TestNode::start_with({
        let addr = a.federation_addrs().await;
        move |c| {
            hearth_tests::federated(c, "b.test", addr);
            c.presence_refresh_secs = 3600;
        }
    })
    .await;
    let (alice, bob, mut al) = alice_writes_to_bob(&a, &b).await;
    let bo = bob.connect().await;
    al.wait_for(bob_is(PresenceStatus::Online)).await;
    let online_at = std::time::Instant::now();

    // Bob stays connected, but nothing more comes from b.
    al.wait_for(bob_is(PresenceStatus::Offline)).await;
    assert!(
        online_at.elapsed() >= std::time::Duration::from_secs(2),
        "bob was told offline after {:?}, before his online had expired",
        online_at.elapsed()
    );
    let looked_up = alice.api.presence(["bob@b.test"]).await.expect("presence");
    assert_eq!(looked_up.presence[0].status, PresenceStatus::Offline);

    // b speaks again: bob's next change is pushed as a change.
    bo.close().await;
    let _again = bob.connect().await;
    al.wait_for(bob_is(PresenceStatus::Online)).await;
}

#[tokio::test]
async fn a_peer_that_floods_oversized_or_invalid_data_is_refused_then_cut_off_and_the_node_stays_up()
 {
    let a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let rogue = TestNode::server("rogue.test", &a_addr).await;
    let rogue_fed = rogue.services().federation.clone().expect("federation");
    eventually("the rogue has met a", || {
        let known = rogue_fed.known_servers();
        async move { known.contains(&"a.test".to_string()) }
    })
    .await;

    // Too many events in one push.
    match rogue_fed
        .push_raw("a.test", vec!["{}".to_string(); 501])
        .await
    {
        Ok(FedResponse::Refused { code, .. }) => assert_eq!(code, "too_large"),
        other => panic!("an oversized push must be refused, got {other:?}"),
    }
    // A request beyond the 1 MiB cap never reaches the handler.
    let huge = rogue_fed
        .push_raw("a.test", vec!["x".repeat(2 << 20)])
        .await;
    assert!(
        !matches!(huge, Ok(FedResponse::Pushed { accepted, .. }) if accepted > 0),
        "{huge:?}"
    );
    // A flood of invalid events: refused, and the sender is cut off.
    let garbage: Vec<String> = (0..60)
        .map(|i| format!("{{\"v\":1,\"junk\":{i}}}"))
        .collect();
    let _ = rogue_fed.push_raw("a.test", garbage).await;
    eventually("the rogue is cut off", || {
        let fed = rogue_fed.clone();
        async move { fed.push_raw("a.test", vec!["{}".into()]).await.is_err() }
    })
    .await;
    assert!(a.metric("hearth_federation_refused_total") >= 60.0);

    // The node itself is unharmed: its users and other servers carry on.
    let b = TestNode::server("b.test", &a_addr).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let mut bo = bob.connect().await;
    let mut al = alice.connect().await;
    al.send_to("bob@b.test", "still here").await;
    assert_eq!(bo.message().await.1, "still here");
}

#[tokio::test]
async fn members_on_other_servers_leave_and_are_added_through_the_home_server() {
    let (a, b) = pair().await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = b.user("carol").await;
    let dave = b.user("dave").await;
    let group = alice
        .api
        .create_group("homed on a", &["bob@b.test".into(), "carol@b.test".into()])
        .await
        .expect("group");
    let members_on_b = |user: &hearth_tests::TestUser| {
        let api = user.api.clone();
        let channel = group.id.clone();
        async move {
            api.members(&channel)
                .await
                .map(|m| {
                    m.members
                        .iter()
                        .map(|m| m.user.clone())
                        .collect::<BTreeSet<_>>()
                })
                .unwrap_or_default()
        }
    };
    eventually("b knows the group", || {
        let m = members_on_b(&carol);
        async move { m.await.len() == 3 }
    })
    .await;

    // Bob leaves through his own server; the home server decides and tells everyone.
    bob.api.leave(&group.id).await.expect("bob leaves");
    eventually("b applied the home server's leave", || {
        let m = members_on_b(&carol);
        async move { !m.await.contains("bob@b.test") }
    })
    .await;
    let on_a = alice.api.members(&group.id).await.expect("members on a");
    assert_eq!(on_a.members.len(), 2);

    // An admin on the home server adds a user of b; b learns it.
    alice
        .api
        .add_member(&group.id, "dave@b.test")
        .await
        .expect("add dave");
    eventually("dave is a member on b", || {
        let m = members_on_b(&carol);
        async move { m.await.contains("dave@b.test") }
    })
    .await;

    // Messages follow the new membership on both servers.
    let mut ca = carol.connect().await;
    let mut da = dave.connect().await;
    let mut al = alice.connect().await;
    al.send_in(&group.id, "after the changes").await;
    assert_eq!(ca.message().await.1, "after the changes");
    assert_eq!(da.message().await.1, "after the changes");
    let err = bob.api.history(&group.id, None, None).await.unwrap_err();
    assert_eq!(err.code(), Some(hearth_client_api::ErrorCode::NotMember));
}

#[tokio::test]
async fn a_server_whose_first_user_joins_an_old_group_is_sent_its_history_of_membership() {
    // Periodic catch-up is out of reach in tests (see `federated`), so c can only
    // learn the group's earlier membership by having it pushed with the add.
    let a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let b = TestNode::server("b.test", &a_addr).await;
    let c = TestNode::server("c.test", &a_addr).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = c.user("carol").await;
    let group = alice
        .api
        .create_group("grows", &["bob@b.test".into()])
        .await
        .expect("group");
    let mut al = alice.connect().await;
    let mut bo = bob.connect().await;
    al.send_in(&group.id, "before carol").await;
    assert_eq!(bo.message().await.1, "before carol");

    alice
        .api
        .add_member(&group.id, "carol@c.test")
        .await
        .expect("add carol");
    let mut ca = carol.connect().await;
    bo.send_in(&group.id, "hello carol").await;
    assert_eq!(
        ca.message().await,
        ("bob@b.test".into(), "hello carol".into()),
        "a message from the third server reaches the newcomer"
    );
    let members = carol.api.members(&group.id).await.expect("members on c");
    assert_eq!(members.members.len(), 3);
}

#[tokio::test]
async fn an_outbox_past_its_retention_is_dropped_and_the_server_still_catches_up_when_back() {
    let a = TestNode::start_with(|c| {
        hearth_tests::federated(c, "a.test", Vec::new());
        c.outbox_retention_secs = 1;
    })
    .await;
    // c exists, but is not connected to anyone yet.
    let mut c = TestNode::server("c.test", &[]).await;
    let carol = c.user("carol").await;
    let alice = a.user("alice").await;
    let group = alice
        .api
        .create_group("waiting", &["carol@c.test".into()])
        .await
        .expect("group");
    let mut al = alice.connect().await;
    al.send_in(&group.id, "while c was away").await;

    let store = a.services().store.clone();
    eventually("a dropped its outbox to c after the retention", || {
        let empty = store.outbox("c.test", None, 10).map(|e| e.is_empty());
        async move { empty.unwrap_or(false) }
    })
    .await;
    assert!(a.metric("hearth_federation_outbox_expired_total") >= 3.0);

    // c comes back: catch-up brings the group and the message all the same.
    c.restart_with_bootstrap(&a.federation_addrs().await).await;
    let carol = c.login(&carol).await;
    let api = carol.api.clone();
    let channel = group.id.clone();
    eventually("the message reached c by catch-up", || {
        let api = api.clone();
        let channel = channel.clone();
        async move {
            api.history(&channel, None, None).await.is_ok_and(|h| {
                h.events.iter().any(|e| {
                    matches!(&e.content, EventContent::Message { body } if body == "while c was away")
                })
            })
        }
    })
    .await;
    let ca = carol.connect().await;
    assert!(
        ca.backlog.iter().any(
            |e| matches!(&e.content, EventContent::Message { body } if body == "while c was away")
        ),
        "carol's devices get it too"
    );
}

#[tokio::test]
async fn a_denied_server_is_refused_both_ways() {
    let a = TestNode::start_with(|c| {
        hearth_tests::federated(c, "a.test", vec![]);
        c.deny_servers = vec!["b.test".into()];
    })
    .await;
    let b = TestNode::server("b.test", &a.federation_addrs().await).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let err = alice.api.open_direct("bob@b.test").await.unwrap_err();
    assert_eq!(err.code(), Some(hearth_client_api::ErrorCode::UnknownUser));
    eventually("a refused b's introduction", || {
        let refused = a.metric("hearth_federation_refused_total");
        async move { refused >= 1.0 }
    })
    .await;
    let mut bo = bob.connect().await;
    bo.send_to("alice@a.test", "let me in").await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let channels = alice.api.channels().await.expect("channels").channels;
    assert!(
        channels.is_empty(),
        "nothing from a denied server reaches a: {channels:?}"
    );
}

#[tokio::test]
async fn strict_mode_trusts_only_configured_keys() {
    let b = TestNode::server("b.test", &[]).await;
    let c = TestNode::server("c.test", &[]).await;
    let b_key = b
        .services()
        .federation
        .clone()
        .expect("federation")
        .public_key();
    let mut boot = b.federation_addrs().await;
    boot.extend(c.federation_addrs().await);
    let a = TestNode::start_with(move |cfg| {
        hearth_tests::federated(cfg, "a.test", boot);
        cfg.strict_keys = true;
        cfg.peers = vec![hearth_node::config::PeerConfig {
            name: "b.test".into(),
            addr: None,
            key: Some(b_key),
        }];
    })
    .await;
    let a_fed = a.services().federation.clone().expect("federation");
    eventually("a trusts the pinned b", || {
        let known = a_fed.known_servers();
        async move { known.contains(&"b.test".to_string()) }
    })
    .await;
    eventually("a refused the unpinned c", || {
        let refused = a.metric("hearth_federation_refused_total");
        async move { refused >= 1.0 }
    })
    .await;
    assert!(!a_fed.known_servers().contains(&"c.test".to_string()));
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let mut bo = bob.connect().await;
    let mut al = alice.connect().await;
    al.send_to("bob@b.test", "pinned and trusted").await;
    assert_eq!(bo.message().await.1, "pinned and trusted");
}

/// Waits until `user`'s server holds a message with `body` in `channel`'s history.
async fn history_holds(what: &str, user: &hearth_tests::TestUser, channel: &str, body: &str) {
    eventually(what, || {
        let api = user.api.clone();
        let channel = channel.to_string();
        let body = body.to_string();
        async move {
            let page = api.history(&channel, None, Some(100)).await;
            page.map(|p| bodies(&p.events).contains(&body))
                .unwrap_or(false)
        }
    })
    .await;
}

#[tokio::test]
async fn messages_a_server_missed_reach_only_those_who_were_members_when_sent_and_still_are() {
    let a = TestNode::server("a.test", &[]).await;
    let a_addr = a.federation_addrs().await;
    let mut b = TestNode::server("b.test", &a_addr).await;
    let b_addr = b.federation_addrs().await;
    let mut c_boot = a_addr.clone();
    c_boot.extend(b_addr);
    let mut c = TestNode::server("c.test", &c_boot).await;
    let alice = a.user("alice").await;
    let bob = b.user("bob").await;
    let carol = c.user("carol").await;
    let dan = c.user("dan").await;
    let erin = c.user("erin").await;
    let group = alice
        .api
        .create_group(
            "late",
            &[
                "bob@b.test".into(),
                "carol@c.test".into(),
                "erin@c.test".into(),
            ],
        )
        .await
        .expect("group");
    eventually("carol's server knows the group", || {
        let api = carol.api.clone();
        let channel = group.id.clone();
        async move { api.channel(&channel).await.is_ok() }
    })
    .await;

    // While c is down, bob writes, and only then is dan (also on c) added and erin
    // (on c too) removed. b goes down once a holds the message, so c can only get it
    // by catching up from a, which hands over membership first: c judges the message
    // knowing the changes made after it. (Had b pushed it before c heard of erin's
    // removal, she would rightly have got it: she was still a member there then.)
    c.stop().await;
    let mut bo = bob.connect().await;
    bo.send_in(&group.id, "while c was away").await;
    history_holds(
        "a holds bob's message",
        &alice,
        &group.id,
        "while c was away",
    )
    .await;
    bo.close().await;
    b.stop().await;
    alice
        .api
        .add_member(&group.id, "dan@c.test")
        .await
        .expect("add dan");
    alice
        .api
        .remove_member(&group.id, "erin@c.test")
        .await
        .expect("remove erin");
    c.restart_with_bootstrap(&a_addr).await;
    let carol = carol.on(&c);
    let dan = dan.on(&c);
    let erin = erin.on(&c);
    history_holds(
        "c caught up with bob's message",
        &carol,
        &group.id,
        "while c was away",
    )
    .await;
    eventually("dan is a member on c", || {
        let api = dan.api.clone();
        let channel = group.id.clone();
        async move { api.channel(&channel).await.is_ok() }
    })
    .await;

    eventually("erin is no longer a member on c", || {
        let api = erin.api.clone();
        let channel = group.id.clone();
        async move { api.channel(&channel).await.is_err() }
    })
    .await;

    // Carol was a member when bob wrote and still is; erin was, but left before c
    // heard of it; dan was not: his inbox holds only his add, and the next message is
    // the first he hears.
    let ca = carol.connect().await;
    assert_eq!(bodies(&ca.backlog), vec!["while c was away".to_string()]);
    let er = erin.connect().await;
    assert!(
        bodies(&er.backlog).is_empty(),
        "a message that arrives after erin was removed is not delivered to her: {:?}",
        bodies(&er.backlog)
    );
    let mut da = dan.connect().await;
    assert!(
        bodies(&da.backlog).is_empty(),
        "a message sent before dan joined is not delivered to him: {:?}",
        bodies(&da.backlog)
    );
    let mut al = alice.connect().await;
    al.send_in(&group.id, "welcome dan").await;
    assert_eq!(
        da.message().await,
        ("alice@a.test".into(), "welcome dan".into())
    );
}
