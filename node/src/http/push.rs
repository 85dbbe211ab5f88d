//! The push notification routes: the VAPID key, the caller's targets, their settings.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get};
use axum::{Json, Router};
use hearth_client_api::http::{NewPushTarget, PushSettings, PushTargetList, VapidKey};

use super::{Authed, Body};
use crate::Services;
use crate::error::ApiResult;

type Svc = State<Arc<Services>>;

pub(super) fn routes() -> Router<Arc<Services>> {
    Router::new()
        .route("/v1/push/vapid", get(vapid))
        .route("/v1/push/targets", get(targets).post(add_target))
        .route("/v1/push/targets/{id}", delete(remove_target))
        .route("/v1/push/settings", get(settings).put(set_settings))
}

async fn vapid(State(svc): Svc) -> Json<VapidKey> {
    Json(VapidKey {
        public_key: svc.push.vapid_public_key().to_string(),
    })
}

async fn targets(State(svc): Svc, Authed(auth): Authed) -> ApiResult<Json<PushTargetList>> {
    Ok(Json(PushTargetList {
        targets: svc.push.targets(&auth)?,
    }))
}

async fn add_target(
    State(svc): Svc,
    Authed(auth): Authed,
    Body(new): Body<NewPushTarget>,
) -> ApiResult<impl IntoResponse> {
    let target = svc.push.register(&auth, &new).await?;
    Ok((StatusCode::CREATED, Json(target)))
}

async fn remove_target(
    State(svc): Svc,
    Authed(auth): Authed,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    svc.push.remove(&auth, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn settings(State(svc): Svc, Authed(auth): Authed) -> ApiResult<Json<PushSettings>> {
    Ok(Json(svc.push.settings(&auth.user)?))
}

async fn set_settings(
    State(svc): Svc,
    Authed(auth): Authed,
    Body(settings): Body<PushSettings>,
) -> ApiResult<Json<PushSettings>> {
    Ok(Json(svc.push.set_settings(&auth.user, settings).await?))
}
