//! The client API over HTTP: routes, authentication, and the one place errors become responses.

pub mod admin;
mod push;
mod routes;
mod web;
mod ws;

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hearth_client_api::ErrorCode;
use hearth_client_api::http::Problem;
use serde::de::DeserializeOwned;

use crate::Services;
use crate::accounts::DeviceAuth;
use crate::error::ApiError;

/// Largest HTTP request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// The node's router over its services.
pub fn router(svc: Arc<Services>) -> Router {
    routes::routes()
        .merge(web::routes())
        .route("/v1/ws", axum::routing::get(ws::upgrade))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(svc)
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "no such route; see docs/protocol.md")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        ErrorCode::MethodNotAllowed,
        "this route does not take that method",
    )
}

fn title(code: ErrorCode) -> &'static str {
    match code.http_status() {
        400 => "Bad request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not found",
        405 => "Method not allowed",
        409 => "Conflict",
        413 => "Too large",
        429 => "Too many requests",
        _ => "Server error",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let problem = Problem {
            kind: format!("urn:hearth:error:{}", self.code),
            title: title(self.code).to_string(),
            status: status.as_u16(),
            code: self.code,
            detail: self.message,
        };
        let mut res = (status, axum::Json(problem)).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        res
    }
}

/// A JSON body whose rejections are problem documents with stable codes.
pub struct Body<T>(pub T);

impl<T, S> FromRequest<S> for Body<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(rejection) => Err(match rejection {
                JsonRejection::BytesRejection(_) => ApiError::new(
                    ErrorCode::TooLarge,
                    format!("the body is larger than {MAX_BODY_BYTES} bytes, or unreadable"),
                ),
                other => ApiError::new(ErrorCode::BadRequest, other.body_text()),
            }),
        }
    }
}

/// The authenticated device of a request (`Authorization: Bearer <token>`).
pub struct Authed(pub DeviceAuth);

impl FromRequestParts<Arc<Services>> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, svc: &Arc<Services>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::Unauthorized,
                    "send the device's token as 'Authorization: Bearer <token>'",
                )
            })?;
        svc.accounts.authenticate(token.trim()).map(Authed)
    }
}
