# The model in an Object Storage bucket of the pool's region (model_file): uploaded by Terraform,
# read by the builder and the nodes through a pre-authenticated request for that one object,
# read-only and expiring at model_par_expires, and checked on each node against model_sha256.
# The request's URL is in the user data and the state: it lets whoever holds it read the model
# (nothing else) until it expires.

data "oci_objectstorage_namespace" "tenancy" {
  compartment_id = var.compartment_ocid
}

resource "oci_objectstorage_bucket" "models" {
  #checkov:skip=CKV_OCI_9:Encrypted at rest with Oracle-managed keys; the model is the same public weights every node serves, and a customer-managed key (a Vault key and its policy) buys nothing here.
  count          = var.model_file == null ? 0 : 1
  compartment_id = var.compartment_ocid
  namespace      = data.oci_objectstorage_namespace.tenancy.namespace
  name           = "${var.name}-models"
  access_type    = "NoPublicAccess"
  # An overwritten model keeps its earlier version; the nodes' sha256 tells them apart anyway.
  versioning = "Enabled"
  # Object events (uploads, deletions) reach OCI Events, for an audit rule if one is wanted.
  object_events_enabled = true
}

resource "oci_objectstorage_object" "model" {
  count     = var.model_file == null ? 0 : 1
  namespace = data.oci_objectstorage_namespace.tenancy.namespace
  bucket    = oci_objectstorage_bucket.models[0].name
  object    = basename(var.model_file)
  source    = var.model_file
  # The pin travels with the object, for whoever looks at the bucket.
  metadata = {
    "sha256" = var.model_sha256
  }
}

resource "oci_objectstorage_preauthrequest" "model" {
  count        = var.model_file == null ? 0 : 1
  namespace    = data.oci_objectstorage_namespace.tenancy.namespace
  bucket       = oci_objectstorage_bucket.models[0].name
  name         = "${var.name}-model-read"
  access_type  = "ObjectRead"
  object       = oci_objectstorage_object.model[0].object
  time_expires = var.model_par_expires
}
