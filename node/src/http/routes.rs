//! The stateless HTTP routes: one small handler per endpoint, each calling a service.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use hearth_client_api::ErrorCode;
use hearth_client_api::http::{
    AddMember, ChannelList, CreateGroup, Credentials, DeviceList, HistoryPage, Me, MemberList,
    OpenDirect, PresenceList, Profile,
};
use hearth_client_api::model::ChannelSummary;
use serde::Deserialize;

use super::{Authed, Body};
use crate::Services;
use crate::error::{ApiError, ApiResult};

type Svc = State<Arc<Services>>;

pub(super) fn routes() -> Router<Arc<Services>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/register", post(register))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/logout/all", post(logout_all))
        .route("/v1/me", get(me))
        .route("/v1/devices", get(devices))
        .route("/v1/devices/{device}", delete(delete_device))
        .route("/v1/profile", axum::routing::put(set_profile))
        .route("/v1/profile/{user}", get(profile))
        .route("/v1/channels", get(list_channels).post(create_group))
        .route("/v1/direct", post(open_direct))
        .route("/v1/channels/{id}", get(channel))
        .route("/v1/channels/{id}/members", get(members).post(add_member))
        .route("/v1/channels/{id}/members/{user}", delete(remove_member))
        .route("/v1/channels/{id}/leave", post(leave))
        .route("/v1/channels/{id}/messages", get(history))
        .route("/v1/presence", get(presence))
        .merge(super::push::routes())
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(svc): Svc) -> impl IntoResponse {
    if svc.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    }
}

async fn metrics(State(svc): Svc) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        svc.metrics.render(),
    )
}

async fn register(State(svc): Svc, Body(c): Body<Credentials>) -> ApiResult<impl IntoResponse> {
    let session = svc
        .accounts
        .register(&c.username, &c.password, c.device_name.as_deref())
        .await?;
    Ok((StatusCode::CREATED, Json(session)))
}

async fn login(State(svc): Svc, Body(c): Body<Credentials>) -> ApiResult<impl IntoResponse> {
    let session = svc
        .accounts
        .login(&c.username, &c.password, c.device_name.as_deref())
        .await?;
    Ok(Json(session))
}

async fn logout(State(svc): Svc, Authed(auth): Authed) -> ApiResult<StatusCode> {
    svc.accounts.logout(&auth.user, &auth.device).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(State(svc): Svc, Authed(auth): Authed) -> ApiResult<StatusCode> {
    svc.accounts.logout_all(&auth.user).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(svc): Svc, Authed(auth): Authed) -> ApiResult<Json<Me>> {
    Ok(Json(Me {
        display_name: svc.accounts.display_name(&auth.user)?,
        server: svc.accounts.server_name().to_string(),
        user: auth.user,
        device: auth.device,
    }))
}

async fn devices(State(svc): Svc, Authed(auth): Authed) -> ApiResult<Json<DeviceList>> {
    Ok(Json(DeviceList {
        devices: svc.accounts.devices(&auth)?,
    }))
}

async fn delete_device(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(device): Path<String>,
) -> ApiResult<StatusCode> {
    svc.accounts.logout(&auth.user, &device).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn profile(State(svc): Svc, _: Authed, Path(user): Path<String>) -> ApiResult<Json<Profile>> {
    let user = svc.accounts.resolve_local_user(&user)?;
    Ok(Json(Profile {
        display_name: svc.accounts.display_name(&user)?,
        user,
    }))
}

async fn set_profile(
    State(svc): Svc,
    Authed(auth): Authed,
    Body(p): Body<Profile>,
) -> ApiResult<Json<Profile>> {
    svc.accounts
        .set_display_name(&auth.user, p.display_name.clone())
        .await?;
    Ok(Json(Profile {
        user: auth.user,
        display_name: p.display_name,
    }))
}

async fn list_channels(State(svc): Svc, Authed(auth): Authed) -> ApiResult<Json<ChannelList>> {
    Ok(Json(ChannelList {
        channels: svc.channels.list(&auth.user)?,
    }))
}

async fn create_group(
    State(svc): Svc,
    Authed(auth): Authed,
    Body(g): Body<CreateGroup>,
) -> ApiResult<impl IntoResponse> {
    let summary = svc
        .channels
        .create_group(&auth, &g.name, &g.members)
        .await?;
    Ok((StatusCode::CREATED, Json(summary)))
}

async fn open_direct(
    State(svc): Svc,
    Authed(auth): Authed,
    Body(d): Body<OpenDirect>,
) -> ApiResult<Json<ChannelSummary>> {
    Ok(Json(svc.channels.open_direct(&auth, &d.user).await?))
}

async fn channel(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<ChannelSummary>> {
    Ok(Json(svc.channels.summary(&auth.user, &id)?))
}

async fn members(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
) -> ApiResult<Json<MemberList>> {
    Ok(Json(svc.channels.members(&auth.user, &id)?))
}

async fn add_member(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
    Body(m): Body<AddMember>,
) -> ApiResult<Json<MemberList>> {
    Ok(Json(svc.channels.add_member(&auth, &id, &m.user).await?))
}

async fn remove_member(
    State(svc): Svc,
    Authed(auth): Authed,
    Path((id, user)): Path<(String, String)>,
) -> ApiResult<Json<MemberList>> {
    Ok(Json(svc.channels.remove_member(&auth, &id, &user).await?))
}

async fn leave(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    svc.channels.leave(&auth, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<HistoryPage>> {
    let Query(q) = query.map_err(|e| ApiError::new(ErrorCode::InvalidField, e.body_text()))?;
    Ok(Json(svc.channels.history(
        &auth.user,
        &id,
        q.before.as_deref(),
        q.limit,
    )?))
}

#[derive(Deserialize)]
struct PresenceQuery {
    users: String,
}

/// Most users one presence look-up may name.
const MAX_PRESENCE_USERS: usize = 200;

async fn presence(
    State(svc): Svc,
    _: Authed,
    query: Result<Query<PresenceQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<PresenceList>> {
    let Query(q) = query.map_err(|_| {
        ApiError::new(
            ErrorCode::InvalidField,
            "give users as ?users=a@server,b@server",
        )
    })?;
    let names: Vec<&str> = q
        .users
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if names.len() > MAX_PRESENCE_USERS {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            format!("ask for at most {MAX_PRESENCE_USERS} users at once"),
        ));
    }
    let mut presence = Vec::new();
    for name in names {
        if let Ok(user) = svc.accounts.resolve_user(name) {
            presence.push(svc.presence.status(&user)?);
        }
    }
    Ok(Json(PresenceList { presence }))
}
