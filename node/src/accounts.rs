//! Accounts and devices: registration, password login, access tokens, device cursors.

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hearth_client_api::ErrorCode;
use hearth_client_api::http::Session;
use hearth_client_api::model::DeviceInfo;
use hearth_federation::clock::wall_ms;
use sha2::{Digest, Sha256};
use tracing::{info, instrument};

use crate::config::{FederationPolicy, Registration};
use crate::error::{ApiError, ApiResult};
use crate::hub::Hub;
use crate::store::{AccountRecord, DeviceKey, DeviceRecord, Store};

/// Longest password accepted, so hashing cost stays bounded.
const MAX_PASSWORD_BYTES: usize = 1024;
const MIN_PASSWORD_BYTES: usize = 8;

/// The authenticated caller of a request or session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceAuth {
    /// Full user id.
    pub user: String,
    /// Device id.
    pub device: String,
}

/// Account rules over the store.
#[derive(Clone)]
pub struct Accounts {
    store: Store,
    hub: Hub,
    server_name: String,
    registration: Registration,
    policy: FederationPolicy,
}

/// Whether `name` is a usable server name (domain-like, lowercase).
pub fn valid_server_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        })
}

/// Whether `name` is a usable user name (the local part of a user id).
pub fn valid_username(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}

fn random_token(bytes: usize) -> Result<String, ApiError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| {
        tracing::error!(error = %e, "system random source failed");
        ApiError::new(ErrorCode::Internal, "the server failed; try again")
    })?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// The stored form of a token: its SHA-256, hex. Tokens carry 256 random bits, so
/// a fast hash is enough; no one can guess a preimage.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A device name as given, or the default; 1 to 64 characters.
fn device_name_of(given: Option<&str>) -> ApiResult<&str> {
    let name = given.unwrap_or("unnamed device").trim();
    if name.is_empty() || name.chars().count() > 64 {
        return Err(ApiError::new(
            ErrorCode::InvalidField,
            "device_name must be 1 to 64 characters",
        ));
    }
    Ok(name)
}

fn internal(what: &str) -> ApiError {
    tracing::error!("{what}");
    ApiError::new(ErrorCode::Internal, "the server failed; try again")
}

async fn hash_password(password: String) -> ApiResult<String> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .hash_password(password.as_bytes())
            .map(|h| h.to_string())
            .map_err(|e| internal(&format!("password hashing failed: {e}")))
    })
    .await
    .map_err(|_| internal("password hashing task failed"))?
}

async fn verify_password(password: String, hash: String) -> ApiResult<bool> {
    tokio::task::spawn_blocking(move || {
        Argon2::default()
            .verify_password(password.as_bytes(), hash.as_str())
            .is_ok()
    })
    .await
    .map_err(|_| internal("password verification task failed"))
}

impl Accounts {
    /// Account rules for the node named `server_name`.
    pub fn new(
        store: Store,
        hub: Hub,
        registration: Registration,
        policy: FederationPolicy,
    ) -> Self {
        Accounts {
            store,
            hub,
            server_name: policy.own.clone(),
            registration,
            policy,
        }
    }

    /// Which servers this node federates with.
    pub fn policy(&self) -> &FederationPolicy {
        &self.policy
    }

    /// Resolves what a client typed (`bob`, `bob@here`, `bob@elsewhere`) to a user id:
    /// an existing local user, or a well-formed user of a server this node federates with.
    pub fn resolve_user(&self, who: &str) -> ApiResult<String> {
        match who.split_once('@') {
            Some((local, server)) if server != self.server_name => {
                if !valid_username(local) || !valid_server_name(server) {
                    return Err(ApiError::new(
                        ErrorCode::InvalidField,
                        format!("{who:?} is not a valid user id"),
                    ));
                }
                if !self.policy.federates_with(server) {
                    return Err(ApiError::new(
                        ErrorCode::UnknownUser,
                        format!("{who} is on {server}, and this node does not federate with it"),
                    ));
                }
                Ok(who.to_string())
            }
            _ => self.resolve_local_user(who),
        }
    }

    /// This node's server name.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// `name@server` for a local user name.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("{localpart}@{}", self.server_name)
    }

    /// Resolves what a client typed (`bob` or `bob@server`) to a full user id of an
    /// existing local user.
    pub fn resolve_local_user(&self, who: &str) -> ApiResult<String> {
        let (local, server) = match who.split_once('@') {
            Some((l, s)) => (l, s),
            None => (who, self.server_name.as_str()),
        };
        if server != self.server_name {
            return Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("{who} is on another server, and this node does not federate yet"),
            ));
        }
        if !valid_username(local) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("{who:?} is not a valid user id"),
            ));
        }
        match self.store.account(local)? {
            Some(_) => Ok(self.user_id(local)),
            None => Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("there is no user {local}@{server}"),
            )),
        }
    }

    fn check_credentials_shape(username: &str, password: &str) -> ApiResult<()> {
        if !valid_username(username) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "username must be 1 to 32 characters of a-z, 0-9, '.', '_' and '-'",
            ));
        }
        if !(MIN_PASSWORD_BYTES..=MAX_PASSWORD_BYTES).contains(&password.len()) {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("password must be {MIN_PASSWORD_BYTES} to {MAX_PASSWORD_BYTES} bytes"),
            ));
        }
        Ok(())
    }

    /// Creates an account (refused when registration is closed, unless `admin`).
    #[instrument(skip(self, password), fields(user = %username))]
    pub async fn create_account(
        &self,
        username: &str,
        password: &str,
        admin: bool,
    ) -> ApiResult<()> {
        if !admin && self.registration == Registration::Closed {
            return Err(ApiError::new(
                ErrorCode::RegistrationClosed,
                "registration is closed on this server; ask its administrator for an account",
            ));
        }
        Self::check_credentials_shape(username, password)?;
        if self.store.account(username)?.is_some() {
            return Err(ApiError::new(
                ErrorCode::UserExists,
                format!("the name {username} is taken"),
            ));
        }
        let rec = AccountRecord {
            password_hash: hash_password(password.to_string()).await?,
            disabled: false,
            created_at: wall_ms(),
            display_name: None,
        };
        if !self.store.create_account(username, &rec)? {
            return Err(ApiError::new(
                ErrorCode::UserExists,
                format!("the name {username} is taken"),
            ));
        }
        self.store.flush().await?;
        info!("account created");
        Ok(())
    }

    /// Registers and logs in the first device.
    pub async fn register(
        &self,
        username: &str,
        password: &str,
        device_name: Option<&str>,
    ) -> ApiResult<Session> {
        device_name_of(device_name)?;
        self.create_account(username, password, false).await?;
        self.login(username, password, device_name).await
    }

    /// Checks the password and creates a new device with its own token.
    #[instrument(skip(self, password, device_name), fields(user = %username))]
    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_name: Option<&str>,
    ) -> ApiResult<Session> {
        let bad = || ApiError::new(ErrorCode::BadCredentials, "wrong username or password");
        if !valid_username(username) || password.len() > MAX_PASSWORD_BYTES {
            return Err(bad());
        }
        let account = self.store.account(username)?;
        // Verify against something even for unknown users, so timing does not tell
        // which names exist.
        let hash = match &account {
            Some(a) => a.password_hash.clone(),
            None => DUMMY_HASH.to_string(),
        };
        let ok = verify_password(password.to_string(), hash).await?;
        let Some(account) = account.filter(|_| ok) else {
            return Err(bad());
        };
        if account.disabled {
            return Err(ApiError::new(
                ErrorCode::AccountDisabled,
                "this account has been disabled by the server's administrator",
            ));
        }
        let name = device_name_of(device_name)?;
        let user = self.user_id(username);
        let device = random_token(9)?;
        let token = random_token(32)?;
        let rec = DeviceRecord {
            name: name.to_string(),
            token_hash: token_hash(&token),
            created_at: wall_ms(),
            cursor: 0,
        };
        self.store.add_device(&user, &device, &rec)?;
        self.store.flush().await?;
        info!(%device, "device logged in");
        Ok(Session {
            user,
            device,
            token,
        })
    }

    /// Who a token belongs to; refuses unknown, revoked and disabled ones.
    pub fn authenticate(&self, token: &str) -> ApiResult<DeviceAuth> {
        let unauthorized = || {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the access token is missing, unknown or revoked; log in again",
            )
        };
        if token.is_empty() || token.len() > 128 {
            return Err(unauthorized());
        }
        let Some(DeviceKey { user, device }) = self.store.device_by_token(&token_hash(token))?
        else {
            return Err(unauthorized());
        };
        let local = user.split('@').next().unwrap_or_default();
        match self.store.account(local)? {
            Some(a) if !a.disabled => Ok(DeviceAuth { user, device }),
            Some(_) => Err(ApiError::new(
                ErrorCode::AccountDisabled,
                "this account has been disabled by the server's administrator",
            )),
            None => Err(unauthorized()),
        }
    }

    /// Logs out one device: its token stops working and its session is closed.
    #[instrument(skip(self), fields(user = %user))]
    pub async fn logout(&self, user: &str, device: &str) -> ApiResult<()> {
        if self.store.remove_device(user, device)?.is_none() {
            return Err(ApiError::new(
                ErrorCode::UnknownDevice,
                format!("you have no device {device}"),
            ));
        }
        self.store.remove_device_push_targets(user, device)?;
        self.store.flush().await?;
        self.hub
            .kick_device(user, device, hearth_client_api::close::LOGGED_OUT);
        info!(%device, "device logged out");
        Ok(())
    }

    /// Logs out every device of a user.
    pub async fn logout_all(&self, user: &str) -> ApiResult<()> {
        for (device, _) in self.store.devices(user)? {
            self.store.remove_device(user, &device)?;
            self.store.remove_device_push_targets(user, &device)?;
            self.hub
                .kick_device(user, &device, hearth_client_api::close::LOGGED_OUT);
        }
        self.store.flush().await?;
        info!(%user, "all devices logged out");
        Ok(())
    }

    /// The caller's devices.
    pub fn devices(&self, auth: &DeviceAuth) -> ApiResult<Vec<DeviceInfo>> {
        Ok(self
            .store
            .devices(&auth.user)?
            .into_iter()
            .map(|(id, rec)| DeviceInfo {
                online: self.hub.device_online(&auth.user, &id),
                current: id == auth.device,
                id,
                name: rec.name,
                created_at: rec.created_at,
                cursor: rec.cursor,
            })
            .collect())
    }

    /// A device's stored sync cursor.
    pub fn cursor(&self, auth: &DeviceAuth) -> ApiResult<u64> {
        match self.store.device(&auth.user, &auth.device)? {
            Some(d) => Ok(d.cursor),
            None => Err(ApiError::new(
                ErrorCode::Unauthorized,
                "this device was logged out",
            )),
        }
    }

    /// Moves a device's cursor forward. Cursor writes need no flush of their own: a
    /// cursor lost in a crash only means a few events are sent again, and the client
    /// drops those by event id.
    pub fn advance_cursor(&self, auth: &DeviceAuth, pos: u64) -> ApiResult<()> {
        self.store.advance_cursor(&auth.user, &auth.device, pos)?;
        Ok(())
    }

    /// A user's display name.
    pub fn display_name(&self, user: &str) -> ApiResult<Option<String>> {
        let local = self.local_part(user)?;
        match self.store.account(local)? {
            Some(a) => Ok(a.display_name),
            None => Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("there is no user {user}"),
            )),
        }
    }

    /// Sets the caller's display name (None clears it).
    pub async fn set_display_name(&self, user: &str, name: Option<String>) -> ApiResult<()> {
        if let Some(n) = &name
            && (n.trim().is_empty() || n.chars().count() > 64)
        {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                "display_name must be 1 to 64 characters",
            ));
        }
        let local = self.local_part(user)?;
        let Some(mut rec) = self.store.account(local)? else {
            return Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("there is no user {user}"),
            ));
        };
        rec.display_name = name;
        self.store.put_account(local, &rec)?;
        self.store.flush().await?;
        Ok(())
    }

    fn local_part<'a>(&self, user: &'a str) -> ApiResult<&'a str> {
        match user.split_once('@') {
            Some((local, server)) if server == self.server_name => Ok(local),
            None => Ok(user),
            _ => Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("{user} is not a user of this server"),
            )),
        }
    }

    /// Admin: every account with its state.
    pub fn list_accounts(&self) -> ApiResult<Vec<(String, AccountRecord)>> {
        Ok(self.store.accounts()?)
    }

    /// Admin: disables an account, revoking all its devices.
    pub async fn disable(&self, username: &str) -> ApiResult<()> {
        let Some(mut rec) = self.store.account(username)? else {
            return Err(ApiError::new(
                ErrorCode::UnknownUser,
                format!("there is no user {username}"),
            ));
        };
        rec.disabled = true;
        self.store.put_account(username, &rec)?;
        self.logout_all(&self.user_id(username)).await?;
        info!(user = %username, "account disabled");
        Ok(())
    }
}

/// An argon2id hash of a random password nobody knows, verified for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$3J5GhbLvmD+1sLlHzhVZ4hs9yTaakuM2SNcE8T7IUoI";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_server_names() {
        assert!(valid_username("alice"));
        assert!(valid_username("a.b_c-9"));
        assert!(!valid_username(""));
        assert!(!valid_username("Alice"));
        assert!(!valid_username("al ice"));
        assert!(!valid_username(&"a".repeat(33)));
        assert!(valid_server_name("localhost"));
        assert!(valid_server_name("acme.example"));
        assert!(!valid_server_name("acme..example"));
        assert!(!valid_server_name("-acme.example"));
        assert!(!valid_server_name("Acme.example"));
    }

    #[test]
    fn tokens_are_stored_as_hashes() {
        let h = token_hash("secret");
        assert_eq!(h.len(), 64);
        assert_ne!(h, "secret");
        assert_eq!(h, token_hash("secret"));
    }

    #[test]
    fn the_dummy_hash_parses() {
        assert!(
            argon2::PasswordHash::new(DUMMY_HASH).is_ok(),
            "login of unknown users must spend the same time as of known ones"
        );
    }
}
