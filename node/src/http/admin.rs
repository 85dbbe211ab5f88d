//! The admin API: accounts managed on a running node, over a Unix socket in its data folder.
//!
//! Only the operator reaches it: the socket lives in the data folder and is made
//! readable and writable by the node's own user alone, so whoever may use it could
//! as well read the store. `hearth user ...` uses it when a node runs on the folder,
//! and opens the store itself when none does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{info, warn};

use hearth_client_api::ErrorCode;

use super::{Body, MAX_BODY_BYTES, method_not_allowed};
use crate::Services;
use crate::error::ApiError;

/// The socket's name in the data folder.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// Longest socket path Linux accepts (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `POST /admin/users`: a new account, made whatever the registration setting.
#[derive(Debug, Serialize, Deserialize)]
pub struct NewUser {
    /// User name (local part).
    pub name: String,
    /// Its password.
    pub password: String,
}

/// An account as the admin API shows it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminUser {
    /// Full user id.
    pub user: String,
    /// Whether it is disabled.
    pub disabled: bool,
}

/// `GET /admin/users`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminUsers {
    /// Every account, by name.
    pub users: Vec<AdminUser>,
}

fn router(svc: Arc<Services>) -> Router {
    Router::new()
        .route("/admin/users", get(list).post(add))
        .route("/admin/users/{name}/disable", post(disable))
        .fallback(no_such_admin_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(svc)
}

async fn no_such_admin_route() -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        "no such admin route; see docs/operations.md, \"Accounts\"",
    )
}

async fn add(
    State(svc): State<Arc<Services>>,
    Body(new): Body<NewUser>,
) -> Result<(StatusCode, axum::Json<AdminUser>), ApiError> {
    svc.accounts
        .create_account(&new.name, &new.password, true)
        .await?;
    info!(user = %new.name, "account created by the operator");
    Ok((
        StatusCode::CREATED,
        axum::Json(AdminUser {
            user: svc.accounts.user_id(&new.name),
            disabled: false,
        }),
    ))
}

async fn list(State(svc): State<Arc<Services>>) -> Result<axum::Json<AdminUsers>, ApiError> {
    let users = svc
        .accounts
        .list_accounts()?
        .into_iter()
        .map(|(name, rec)| AdminUser {
            user: svc.accounts.user_id(&name),
            disabled: rec.disabled,
        })
        .collect();
    Ok(axum::Json(AdminUsers { users }))
}

async fn disable(
    State(svc): State<Arc<Services>>,
    UrlPath(name): UrlPath<String>,
) -> Result<axum::Json<AdminUser>, ApiError> {
    svc.accounts.disable(&name).await?;
    Ok(axum::Json(AdminUser {
        user: svc.accounts.user_id(&name),
        disabled: true,
    }))
}

/// The admin socket of the node on `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(ADMIN_SOCKET)
}

/// Serves the admin API on the data folder's socket until `shutdown` turns true,
/// then removes the socket. The caller holds the store's lock, so a socket file
/// already there is a crashed node's and is replaced. Without a socket (a path too
/// long for one, a folder that refuses it) the node runs on and says so: the admin
/// commands then need it stopped.
pub fn serve(svc: Arc<Services>, mut shutdown: watch::Receiver<bool>) {
    let path = socket_path(&svc.config.data_dir);
    let listener = match bind(&path) {
        Ok(listener) => listener,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "no admin socket; `hearth user` needs the node stopped");
            return;
        }
    };
    info!(path = %path.display(), "admin socket ready");
    let app = router(svc);
    tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            warn!(error = %e, "admin socket failed");
        }
        let _ = std::fs::remove_file(&path);
    });
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(std::io::Error::other(format!(
            "the path is longer than {MAX_SOCKET_PATH} bytes"
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
