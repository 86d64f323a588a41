//! The Mobile Identity endpoints: SIM swap, Identity Match and Number Verify (fact sheet
//! §2.1-2.4).

use http::{Method, Response, StatusCode};
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, Duration, OffsetDateTime};

use super::{
    id_in, lock, object, object_text,
    sandbox::{self, Claims},
    ApiError, Fields, Inner, Received, Subscribed, SESSION_PATH,
};
use crate::server::Body;

/// The Identity Match answer keys in CM.com's order (fact sheet §2.2); the `score` names are
/// ours, CM.com's are unknown.
const MATCH_KEYS: [&str; 6] = [
    "firstNameMatch",
    "lastNameMatch",
    "nameMatch",
    "addressMatch",
    "postalCodeMatch",
    "dateOfBirthMatch",
];
const SCORE_KEYS: [&str; 6] = [
    "firstNameScore",
    "lastNameScore",
    "nameScore",
    "addressScore",
    "postalCodeScore",
    "dateOfBirthScore",
];

/// A Number Verify transaction: `pending` until its `sessionUrl` is loaded (fact sheet §2.4).
#[derive(Debug)]
pub(super) enum NumberVerify {
    /// `sandbox`: whether the number is one of CM.com's sandbox numbers, which is what the
    /// device "proves" when it loads the `sessionUrl`.
    Pending {
        sandbox: bool,
    },
    Completed {
        matched: bool,
    },
    Failed,
}

impl NumberVerify {
    /// The device loaded the `sessionUrl`: completed, or failed if asked to. Only a pending
    /// transaction moves; whether it did is returned.
    pub(super) fn load(&mut self, failed: bool) -> bool {
        let Self::Pending { sandbox } = *self else {
            return false;
        };
        *self = if failed {
            Self::Failed
        } else {
            Self::Completed { matched: sandbox }
        };
        true
    }

    fn state(&self) -> (&'static str, Value) {
        match self {
            Self::Pending { .. } => ("pending", Value::Null),
            Self::Completed { matched } => ("completed", Value::from(*matched)),
            Self::Failed => ("failed", Value::Null),
        }
    }

    /// As `GET /number-verify/{id}` shows it: without `sessionUrl`, as CM.com's example.
    pub(super) fn to_response(&self, id: &str) -> Response<Body> {
        let (state, matched) = self.state();
        object(
            StatusCode::OK,
            [
                ("id", id.into()),
                ("state", state.into()),
                ("match", matched),
            ],
        )
    }
}

impl Inner {
    pub(super) fn mobile_identity(
        &self,
        request: Received,
        endpoint: &str,
    ) -> Result<Response<Body>, ApiError> {
        match endpoint {
            "/sim-swap" => {
                request.allow(Method::POST)?;
                sim_swap(&request.object()?, OffsetDateTime::now_utc())
            }
            "/identity-match" => {
                request.allow(Method::POST)?;
                identity_match(&request.object()?)
            }
            "/number-verify" => {
                request.allow(Method::POST)?;
                let origin = request.origin();
                self.start_number_verify(&origin, &request.object()?)
            }
            _ => {
                let id = id_in(endpoint, "/number-verify/")
                    .ok_or(ApiError::NotFound("unknown endpoint"))?;
                request.allow(Method::GET)?;
                let mut transactions = lock(&self.number_verify);
                let transaction = transactions
                    .get_mut(id)
                    .ok_or(ApiError::NotFound("unknown number verify id"))?;
                Ok(transaction.session.to_response(id))
            }
        }
    }

    /// Sends the `numberVerify.state` event (fact sheet §4.1) to the transaction's callback URL.
    pub(super) fn notify_number_verify(
        &self,
        id: &str,
        transaction: &Subscribed<NumberVerify>,
    ) -> Result<(), ApiError> {
        let (state, matched) = transaction.session.state();
        let fields = object_text([
            ("id", id.into()),
            ("state", state.into()),
            ("match", matched),
        ]);
        self.notifier.send(
            &transaction.callback_url,
            self.new_uuid()?,
            "numberVerify.state",
            "numberVerify",
            fields,
        );
        Ok(())
    }

    fn start_number_verify(&self, origin: &str, body: &Fields) -> Result<Response<Body>, ApiError> {
        let phone_number = body.phone_number()?;
        let callback_url = body.callback_url(self.allow_http_callbacks)?.to_owned();
        let (id, token) = self.new_session()?;
        let sandbox = sandbox::identity_of(phone_number).is_some();
        lock(&self.number_verify).insert(
            id.clone(),
            token.clone(),
            Subscribed {
                session: NumberVerify::Pending { sandbox },
                callback_url,
            },
        );
        Ok(object(
            StatusCode::OK,
            [
                ("id", id.into()),
                ("state", "pending".into()),
                ("match", Value::Null),
                (
                    "sessionUrl",
                    format!("{origin}{SESSION_PATH}{token}").into(),
                ),
            ],
        ))
    }
}

fn sim_swap(body: &Fields, now: OffsetDateTime) -> Result<Response<Body>, ApiError> {
    let phone_number = body.phone_number()?;
    let service_type = body.required("serviceType")?;
    if !matches!(service_type, "timestamp" | "24h" | "range") {
        return Err(ApiError::invalid(
            "serviceType",
            "expected timestamp, 24h or range",
        ));
    }
    let identity = sandbox::identity_of(phone_number)
        .ok_or(ApiError::NotFound("no SIM swap data for this phone number"))?;
    let swapped = identity.last_sim_swap(now);
    // The answer's one property is named as the service type (fact sheet §2.1).
    let answer = match service_type {
        "timestamp" => Value::from(
            swapped
                .format(&Rfc3339)
                .map_err(|_| ApiError::Internal("unformattable timestamp"))?,
        ),
        "24h" => Value::from(now - swapped < Duration::DAY),
        _ => {
            let (gt, lt) = sandbox::range(now - swapped);
            json!({ "gt": gt, "lt": lt })
        }
    };
    Ok(object(
        StatusCode::OK,
        [("state", "success".into()), (service_type, answer)],
    ))
}

fn identity_match(body: &Fields) -> Result<Response<Body>, ApiError> {
    let phone_number = body.phone_number()?;
    let service_type = body.required("serviceType")?;
    let keys = match service_type {
        "match" => MATCH_KEYS,
        "score" => SCORE_KEYS,
        _ => return Err(ApiError::invalid("serviceType", "expected match or score")),
    };
    let claims = Claims {
        first_name: body.optional("firstName")?,
        last_name: body.optional("lastName")?,
        address: body.optional("address")?,
        postal_code: body.optional("postalCode")?,
        // Compared as a string, not parsed: CM.com publishes one that is not a date.
        date_of_birth: body.optional("dateOfBirth")?,
    };
    // Checked, not compared: the sandbox table has no second or third address line.
    body.optional("address2")?;
    body.optional("address3")?;
    let verdicts = sandbox::verdicts(sandbox::identity_of(phone_number), &claims);
    let answers = keys.into_iter().zip(verdicts).map(|(key, matched)| {
        let answer = match (service_type, matched) {
            ("match", matched) => Value::from(matched),
            // The sandbox scores 100 or 0 (fact sheet §3.1).
            (_, true) => Value::from(100),
            (_, false) => Value::from(0),
        };
        (key, answer)
    });
    Ok(object(
        StatusCode::OK,
        std::iter::once(("state", Value::from("success"))).chain(answers),
    ))
}
