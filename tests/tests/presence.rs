//! Presence: online on connect, offline on heartbeat timeout or last disconnect, and who is told.

use hearth_client_api::ServerFrame;
use hearth_client_api::close;
use hearth_client_api::model::{PresenceInfo, PresenceStatus};
use hearth_tests::{Device, TestNode};

async fn presence_of(device: &mut Device, user: &str, status: PresenceStatus) -> PresenceInfo {
    let user = user.to_string();
    device
        .wait_for(|f| match f {
            ServerFrame::Presence(p) if p.user == user && p.status == status => Some(p.clone()),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn a_silent_device_times_out_and_its_user_goes_offline_for_their_contacts() {
    let node = TestNode::start_with(|c| c.heartbeat_timeout_secs = 1).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = alice.connect().await;
    a.send_to("bob", "are you there?").await;

    // Bob comes online: Alice is told.
    let mut b = bob.connect().await;
    presence_of(&mut a, "bob@localhost", PresenceStatus::Online).await;
    // Alice heartbeats while she waits (the harness does, as a real client); Bob's
    // device falls silent and is cut off after the timeout.
    let (offline, code) = tokio::join!(
        presence_of(&mut a, "bob@localhost", PresenceStatus::Offline),
        b.closed()
    );
    assert_eq!(code, close::HEARTBEAT_TIMEOUT);
    assert!(offline.last_active_at.is_some());

    let looked_up = alice
        .api
        .presence(["bob@localhost", "alice@localhost"])
        .await
        .expect("presence");
    let bob_now = looked_up
        .presence
        .iter()
        .find(|p| p.user == "bob@localhost")
        .expect("bob");
    assert_eq!(bob_now.status, PresenceStatus::Offline);
    let alice_now = looked_up
        .presence
        .iter()
        .find(|p| p.user == "alice@localhost")
        .expect("alice");
    assert_eq!(alice_now.status, PresenceStatus::Online);
}

#[tokio::test]
async fn a_user_stays_online_until_the_last_device_leaves() {
    let node = TestNode::start().await;
    let alice = node.user("alice").await;
    let alice_phone = node.login(&alice).await;
    let bob = node.user("bob").await;
    let mut b = bob.connect().await;
    b.send_to("alice", "hi").await;

    let laptop = alice.connect().await;
    presence_of(&mut b, "alice@localhost", PresenceStatus::Online).await;
    let phone = alice_phone.connect().await;
    laptop.close().await;
    let status = bob
        .api
        .presence(["alice"])
        .await
        .expect("presence")
        .presence;
    assert_eq!(
        status[0].status,
        PresenceStatus::Online,
        "the phone is still connected"
    );
    phone.close().await;
    presence_of(&mut b, "alice@localhost", PresenceStatus::Offline).await;
}

#[tokio::test]
async fn members_of_large_groups_look_presence_up_instead_of_being_told() {
    let node = TestNode::start_with(|c| c.presence_push_max_members = 2).await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    alice
        .api
        .create_group("big enough", &[bob.id.clone(), carol.id.clone()])
        .await
        .expect("group");
    // Bob and Carol also share a direct chat, so Carol's presence is pushed to Bob;
    // it marks the point after which Alice's would have arrived.
    carol.api.open_direct(&bob.id).await.expect("direct chat");
    let mut b = bob.connect().await;
    let a = alice.connect().await;
    let c = carol.connect().await;
    presence_of(&mut b, "carol@localhost", PresenceStatus::Online).await;
    assert!(
        b.queued_presence_of("alice@localhost").is_none(),
        "a group above the push threshold gets no pushed presence"
    );
    let looked_up = bob
        .api
        .presence(["alice@localhost"])
        .await
        .expect("presence");
    assert_eq!(looked_up.presence[0].status, PresenceStatus::Online);
    drop((a, c));
}
