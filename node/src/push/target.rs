//! What clients may register as push targets, and the guard that keeps the node's
//! requests off loopback, private and link-local addresses (unless the operator
//! allows them), both for addresses written in the URL and for names that resolve
//! to them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hearth_client_api::ErrorCode;
use hearth_client_api::http::{NewPushTarget, PushKind};
use p256::PublicKey;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::{Digest, Sha256};
use web_push_native::Auth;

use crate::error::{ApiError, ApiResult};
use crate::store::push::{PushTargetKind, PushTargetRecord};

/// Longest endpoint accepted.
pub const MAX_ENDPOINT_BYTES: usize = 2048;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidField, message)
}

/// A target's id: derived from the user and the endpoint, so registering the same
/// endpoint again replaces the earlier registration instead of adding a second one.
pub fn target_id(user: &str, endpoint: &str) -> String {
    let mut h = Sha256::new();
    h.update(user.as_bytes());
    h.update([0]);
    h.update(endpoint.as_bytes());
    let mut id = URL_SAFE_NO_PAD.encode(h.finalize());
    id.truncate(16);
    id
}

/// Decodes base64url, padded or not (browsers send it unpadded).
fn b64(what: &str, value: &str) -> ApiResult<Vec<u8>> {
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| invalid(format!("keys.{what} is not base64url")))
}

/// The subscription's public key and secret, decoded and checked.
pub fn decode_keys(p256dh: &str, auth: &str) -> ApiResult<(PublicKey, Auth)> {
    let point = b64("p256dh", p256dh)?;
    if point.len() != 65 || point.first() != Some(&4) {
        return Err(invalid(
            "keys.p256dh must be an uncompressed P-256 point (65 bytes)",
        ));
    }
    let key = PublicKey::from_sec1_bytes(&point)
        .map_err(|_| invalid("keys.p256dh is not a point on P-256"))?;
    let secret = b64("auth", auth)?;
    if secret.len() != 16 {
        return Err(invalid("keys.auth must be 16 bytes"));
    }
    Ok((key, Auth::clone_from_slice(&secret)))
}

/// Checks an endpoint URL: `http` or `https`, a host, no credentials, and (unless
/// `allow_private`) no address literal or name that is obviously local. Names are
/// checked again when they resolve (see [`GuardedResolver`]).
pub fn check_endpoint(endpoint: &str, allow_private: bool) -> Result<Url, String> {
    if endpoint.len() > MAX_ENDPOINT_BYTES {
        return Err(format!(
            "endpoint must be at most {MAX_ENDPOINT_BYTES} bytes"
        ));
    }
    let url = Url::parse(endpoint).map_err(|_| "endpoint is not a URL".to_string())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("endpoint must be an http or https URL".into());
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("endpoint must not carry credentials".into());
    }
    let Some(host) = url.host_str() else {
        return Err("endpoint has no host".into());
    };
    if !allow_private {
        // The URL parser normalises address literals (`2130706433` is 127.0.0.1).
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let local = match bare.parse::<IpAddr>() {
            Ok(ip) => !is_public(ip),
            Err(_) => {
                let name = bare.trim_end_matches('.').to_ascii_lowercase();
                name == "localhost" || name.ends_with(".localhost")
            }
        };
        if local {
            return Err(
                "endpoint is on a local or private address, which this server does not call".into(),
            );
        }
    }
    Ok(url)
}

/// Checks what a client registers and turns it into a record.
pub fn validate(
    new: &NewPushTarget,
    device: &str,
    allow_private: bool,
    now: u64,
) -> ApiResult<PushTargetRecord> {
    check_endpoint(&new.endpoint, allow_private).map_err(invalid)?;
    let (kind, p256dh, auth) = match new.kind {
        PushKind::WebPush => {
            let Some(keys) = &new.keys else {
                return Err(invalid("a web_push target needs keys.p256dh and keys.auth"));
            };
            let (key, secret) = decode_keys(&keys.p256dh, &keys.auth)?;
            use p256::elliptic_curve::sec1::ToEncodedPoint;
            (
                PushTargetKind::WebPush,
                Some(URL_SAFE_NO_PAD.encode(key.to_encoded_point(false).as_bytes())),
                Some(URL_SAFE_NO_PAD.encode(secret.as_slice())),
            )
        }
        PushKind::Webhook => (PushTargetKind::Webhook, None, None),
        _ => return Err(invalid("kind must be web_push or webhook")),
    };
    Ok(PushTargetRecord {
        device: device.to_string(),
        kind,
        endpoint: new.endpoint.clone(),
        p256dh,
        auth,
        created_at: now,
    })
}

/// Whether an address is one the node may call without `push_allow_private`:
/// not loopback, private, link-local, shared (CGNAT), unspecified, multicast,
/// broadcast, documentation or reserved.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00
        || (s[0] & 0xffc0) == 0xfe80
        || (s[0] & 0xffc0) == 0xfec0
        || (s[0] == 0x2001 && s[1] == 0x0db8)
        || (s[0] == 0x64 && s[1] == 0xff9b))
}

/// Resolves names with the system resolver and keeps only addresses the node may
/// call, so a name pointing at an internal address is refused at connection time
/// (no rebinding around the registration check).
pub struct GuardedResolver {
    /// Keep private addresses too.
    pub allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        let allow_private = self.allow_private;
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!("{host} resolves to no address this server calls").into());
            }
            Ok(Box::new(found.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_and_private_addresses_are_refused_unless_allowed() {
        for url in [
            "http://127.0.0.1:9/x",
            "http://10.1.2.3/x",
            "http://192.168.0.1/x",
            "http://169.254.169.254/latest/meta-data",
            "http://100.64.0.1/x",
            "http://[::1]/x",
            "http://[fd00::1]/x",
            "http://[::ffff:127.0.0.1]/x",
            "http://localhost:8080/x",
            "http://api.localhost/x",
            "http://0.0.0.0/x",
            "http://2130706433/x",
        ] {
            assert!(check_endpoint(url, false).is_err(), "{url} refused");
            assert!(
                check_endpoint(url, true).is_ok(),
                "{url} allowed on request"
            );
        }
        assert!(check_endpoint("https://fcm.googleapis.com/fcm/send/abc", false).is_ok());
        assert!(check_endpoint("https://93.184.216.34/x", false).is_ok());
        assert!(check_endpoint("ftp://example.org/x", true).is_err());
        assert!(check_endpoint("https://user:pw@example.org/x", true).is_err());
        assert!(check_endpoint("not a url", true).is_err());
        let long = format!("https://example.org/{}", "a".repeat(MAX_ENDPOINT_BYTES));
        assert!(check_endpoint(&long, true).is_err());
    }

    #[test]
    fn subscription_keys_are_checked() {
        // From RFC 8291, appendix A.
        let p256dh = "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4";
        let auth = "BTBZMqHH6r4Tts7J_aSIgg";
        assert!(decode_keys(p256dh, auth).is_ok());
        assert!(decode_keys(p256dh, "BTBZMqHH6r4Tts7J_aSIgg==").is_ok());
        assert!(decode_keys(p256dh, "c2hvcnQ").is_err());
        assert!(decode_keys("BCVx", auth).is_err());
        let mut off_curve = URL_SAFE_NO_PAD.decode(p256dh).expect("b64");
        off_curve[64] ^= 1;
        assert!(decode_keys(&URL_SAFE_NO_PAD.encode(off_curve), auth).is_err());
    }

    #[test]
    fn the_same_endpoint_gets_the_same_id() {
        assert_eq!(
            target_id("a@h", "https://x/1"),
            target_id("a@h", "https://x/1")
        );
        assert_ne!(
            target_id("a@h", "https://x/1"),
            target_id("a@h", "https://x/2")
        );
        assert_ne!(
            target_id("a@h", "https://x/1"),
            target_id("b@h", "https://x/1")
        );
        assert_eq!(target_id("a@h", "https://x/1").len(), 16);
    }
}
