//! The Verification service (VaaS): `POST /verify` and the sandbox's `PUT /verify/{id}` (fact
//! sheet §2.5, §3.3).

use http::{Method, Response, StatusCode};
use serde_json::Value;

use super::{
    id_in, lock, object, object_text, ApiError, Fields, Inner, Received, Subscribed, SESSION_PATH,
};
use crate::server::Body;

const CHANNELS: [&str; 5] = ["whatsapp", "voice", "sms", "rcs", "viber"];

/// A verification's `state` and `type`, as the API shows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Verification {
    state: &'static str,
    kind: &'static str,
}

impl Verification {
    /// The device loaded the `sessionUrl` of a pending silent verification: silent
    /// authentication succeeded, or failed and the flow fell back to an OTP (`smart`, fact
    /// sheet §2.5.1) that is still pending. Returns what it was before.
    pub(super) fn load(&mut self, failed: bool) -> Self {
        let before = self.clone();
        if (self.state, self.kind) == ("pending", "silent") {
            if failed {
                self.kind = "smart";
            } else {
                self.state = "success";
            }
        }
        before
    }

    pub(super) fn to_response(&self, id: &str) -> Response<Body> {
        object(
            StatusCode::OK,
            [
                ("id", id.into()),
                ("state", self.state.into()),
                ("type", self.kind.into()),
            ],
        )
    }
}

impl Inner {
    pub(super) fn verification(
        &self,
        request: Received,
        endpoint: &str,
    ) -> Result<Response<Body>, ApiError> {
        if endpoint == "/verify" {
            request.allow(Method::POST)?;
            let origin = request.origin();
            return self.start_verification(&origin, &request.object()?);
        }
        let id = id_in(endpoint, "/verify/").ok_or(ApiError::NotFound("unknown endpoint"))?;
        request.allow(Method::PUT)?;
        let code = request.object()?;
        let state = sandbox_state(code.required("verificationCode")?)?;
        let mut verifications = lock(&self.verifications);
        let verification = verifications
            .get_mut(id)
            .ok_or(ApiError::NotFound("unknown verification id"))?;
        // CM.com's example answers `smart` after a code (fact sheet §3.3): a code means an OTP.
        let before = std::mem::replace(
            &mut verification.session,
            Verification {
                state,
                kind: "smart",
            },
        );
        self.notify_verification(id, verification, before)?;
        Ok(verification.session.to_response(id))
    }

    /// Sends `verification.state` and `verification.type` (fact sheet §4.2) to the
    /// verification's callback URL, for each that changed since `before`.
    pub(super) fn notify_verification(
        &self,
        id: &str,
        verification: &Subscribed<Verification>,
        before: Verification,
    ) -> Result<(), ApiError> {
        let now = &verification.session;
        let changed = [
            ("verification.state", before.state != now.state),
            ("verification.type", before.kind != now.kind),
        ];
        for (kind, _) in changed.into_iter().filter(|(_, changed)| *changed) {
            let fields = object_text([
                ("id", id.into()),
                ("state", now.state.into()),
                ("type", now.kind.into()),
            ]);
            self.notifier.send(
                &verification.callback_url,
                self.new_uuid()?,
                kind,
                "verification",
                fields,
            );
        }
        Ok(())
    }

    fn start_verification(&self, origin: &str, body: &Fields) -> Result<Response<Body>, ApiError> {
        body.phone_number()?;
        body.optional("email")?;
        let callback_url = body.callback_url(self.allow_http_callbacks)?.to_owned();
        check_channels(body)?;
        let (id, token) = self.new_session()?;
        lock(&self.verifications).insert(
            id.clone(),
            token.clone(),
            Subscribed {
                session: Verification {
                    state: "pending",
                    kind: "silent",
                },
                callback_url,
            },
        );
        Ok(object(
            StatusCode::OK,
            [
                ("id", id.into()),
                ("state", "pending".into()),
                ("type", "silent".into()),
                (
                    "sessionUrl",
                    format!("{origin}{SESSION_PATH}{token}").into(),
                ),
            ],
        ))
    }
}

/// The state CM.com's sandbox gives a code (fact sheet §3.3); any other code is refused.
fn sandbox_state(code: &str) -> Result<&'static str, ApiError> {
    match code {
        "000000" => Ok("pending"),
        "111111" => Ok("failed"),
        "222222" => Ok("expired"),
        "999999" => Ok("success"),
        _ => Err(ApiError::invalid(
            "verificationCode",
            "the sandbox knows 000000, 111111, 222222 and 999999",
        )),
    }
}

/// `excludeChannels`, if sent: an array of CM.com's channel names (fact sheet §2.5.2).
fn check_channels(body: &Fields) -> Result<(), ApiError> {
    let valid = match body.get("excludeChannels") {
        None => true,
        Some(Value::Array(channels)) => channels.iter().all(|channel| {
            channel
                .as_str()
                .is_some_and(|name| CHANNELS.contains(&name))
        }),
        Some(_) => false,
    };
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "excludeChannels",
            "expected an array of whatsapp, voice, sms, rcs, viber",
        ))
    }
}
