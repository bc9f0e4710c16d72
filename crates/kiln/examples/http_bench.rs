//! Helpers for `make bench`'s HTTP section (scripts/bench.sh):
//! - `http_bench anchor ADDR`: the HTTP ceiling, a trivial axum handler (`GET /` answers a small
//!   JSON object) on the same runtime settings as `kiln serve`;
//! - `http_bench design PATH PX`: writes the sample ring as a PX-pixel JPEG, the design the
//!   submission load orders kits with.

use axum::Json;
use axum::routing::get;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["anchor", addr] => {
            let app = axum::Router::new().route(
                "/",
                get(|| async { Json(serde_json::json!({ "status": "ok" })) }),
            );
            let listener = tokio::net::TcpListener::bind(addr).await?;
            axum::serve(listener, app).await?;
        }
        ["design", path, px] => {
            let image = kiln_assets::sample::ring(px.parse()?);
            std::fs::write(path, kiln_assets::encode_jpeg(&image, 90)?)?;
        }
        _ => anyhow::bail!("usage: http_bench anchor ADDR | http_bench design PATH PX"),
    }
    Ok(())
}
