//! Errors of the library, and the JSON error every HTTP route answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Errors of the library. The errors of other crates are boxed so that `Result`s stay small.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Msg(String),
    #[error("dashboard database: {0}")]
    Db(Box<rusqlite::Error>),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
    #[error(transparent)]
    Models(Box<scalpel_models::ModelError>),
    #[error(transparent)]
    Dict(Box<scalpel_dict::DictError>),
    #[error(transparent)]
    Data(Box<scalpel_data::DataError>),
    #[error(transparent)]
    Circuits(Box<scalpel_circuits::CircuitError>),
}

macro_rules! boxed_from {
    ($($ty:ty => $variant:ident),* $(,)?) => {
        $(impl From<$ty> for Error {
            fn from(e: $ty) -> Self {
                Error::$variant(Box::new(e))
            }
        })*
    };
}

boxed_from!(
    rusqlite::Error => Db,
    candle_core::Error => Candle,
    scalpel_models::ModelError => Models,
    scalpel_dict::DictError => Dict,
    scalpel_data::DataError => Data,
    scalpel_circuits::CircuitError => Circuits,
);

impl Error {
    pub fn msg(s: impl Into<String>) -> Self {
        Error::Msg(s.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An error answered over HTTP: a status and `{"error": message}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    pub fn busy() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is busy: too many requests are queued; retry shortly",
        )
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl From<Error> for ApiError {
    /// Library errors reached through a request are the request's fault unless they are I/O or
    /// database failures.
    fn from(e: Error) -> Self {
        match e {
            Error::Io(_) | Error::Db(_) => ApiError::internal(e.to_string()),
            _ => ApiError::bad_request(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        (self.status, axum::Json(body)).into_response()
    }
}
