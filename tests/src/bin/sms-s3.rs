//! `sms-s3`: a real S3-compatible object store for the log-upload tests. The `s3s` crate
//! parses the S3 REST protocol and verifies every request's signature V4 against the one
//! AK/SK given (a wrong SK is refused as S3 would); `s3s-fs` stores buckets, objects and
//! multipart uploads as files under `--root`, so that a store stopped mid-upload and started
//! again still has the parts uploaded before. `s3s-fs` has no ACLs, so PutObjectAcl is added
//! here: the canned ACL is kept beside the store in `--root`/.acl/BUCKET/KEY.
//!
//! Prints `listening on ADDR` on stdout once it accepts connections.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{s3_error, S3Request, S3Response, S3Result, S3};
use s3s_fs::FileSystem;
use tokio::net::TcpListener;

/// An S3 server over a directory, with signature V4 authentication.
#[derive(Debug, Parser)]
struct Opt {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// The access key id requests must be signed with.
    #[arg(long)]
    ak: String,
    /// The secret key requests must be signed with.
    #[arg(long)]
    sk: String,
    /// Exit (as a crash would: no answer, connections dropped) when the Nth UploadPart
    /// request arrives, before storing it: a store going down in the middle of a multipart
    /// upload, at a point a test can count on.
    #[arg(long)]
    exit_at_part: Option<u64>,
    /// Buckets to create at start (directories under the root).
    #[arg(long = "bucket")]
    buckets: Vec<String>,
    /// Where buckets and objects are kept.
    root: PathBuf,
}

/// `s3s-fs` plus object ACLs.
struct Store {
    fs: FileSystem,
    root: PathBuf,
    exit_at_part: Option<u64>,
    parts: std::sync::atomic::AtomicU64,
}

impl Store {
    fn acl_path(&self, bucket: &str, key: &str) -> S3Result<PathBuf> {
        if bucket.contains('/') || key.split('/').any(|p| p == ".." || p.is_empty()) {
            return Err(s3_error!(InvalidArgument, "bad bucket or key"));
        }
        Ok(self.root.join(".acl").join(bucket).join(key))
    }
}

#[async_trait::async_trait]
impl S3 for Store {
    async fn create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn list_objects_v2(
        &self,
        req: S3Request<ListObjectsV2Input>,
    ) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn put_object(
        &self,
        req: S3Request<PutObjectInput>,
    ) -> S3Result<S3Response<PutObjectOutput>> {
        // s3s-fs would create the bucket's directory; S3 refuses.
        if !self.root.join(&req.input.bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        self.fs.put_object(req).await
    }

    async fn get_object(
        &self,
        req: S3Request<GetObjectInput>,
    ) -> S3Result<S3Response<GetObjectOutput>> {
        self.fs.get_object(req).await
    }

    async fn head_object(
        &self,
        req: S3Request<HeadObjectInput>,
    ) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        // s3s-fs would create the bucket's directory; S3 refuses.
        if !self.root.join(&req.input.bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        self.fs.create_multipart_upload(req).await
    }

    async fn list_parts(
        &self,
        req: S3Request<ListPartsInput>,
    ) -> S3Result<S3Response<ListPartsOutput>> {
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.fs.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.fs.abort_multipart_upload(req).await
    }

    async fn upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let n = self.parts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if self.exit_at_part == Some(n) {
            eprintln!("sms-s3: exiting at UploadPart request {n} (--exit-at-part)");
            std::process::exit(3);
        }
        self.fs.upload_part(req).await
    }

    async fn put_object_acl(
        &self,
        req: S3Request<PutObjectAclInput>,
    ) -> S3Result<S3Response<PutObjectAclOutput>> {
        let i = &req.input;
        let object = self.root.join(&i.bucket).join(&i.key);
        if !self.root.join(&i.bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket));
        }
        if !object.is_file() {
            return Err(s3_error!(NoSuchKey));
        }
        let Some(acl) = &i.acl else {
            return Err(s3_error!(NotImplemented, "only canned ACLs (x-amz-acl)"));
        };
        let path = self.acl_path(&i.bucket, &i.key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| s3_error!(InternalError, "{e}"))?;
        }
        tokio::fs::write(&path, acl.as_str())
            .await
            .map_err(|e| s3_error!(InternalError, "{e}"))?;
        Ok(S3Response::new(PutObjectAclOutput::default()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opt = Opt::parse();
    for b in &opt.buckets {
        std::fs::create_dir_all(opt.root.join(b))?;
    }
    let fs = FileSystem::new(&opt.root).map_err(|e| format!("{}: {e:?}", opt.root.display()))?;
    let mut b = S3ServiceBuilder::new(Store {
        fs,
        root: opt.root.clone(),
        exit_at_part: opt.exit_at_part,
        parts: std::sync::atomic::AtomicU64::new(0),
    });
    b.set_auth(s3s::auth::SimpleAuth::from_single(opt.ak, opt.sk));
    let service = b.build();
    let listener = TcpListener::bind(&opt.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = listener.accept().await?;
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
