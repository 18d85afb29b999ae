terraform {
  required_version = ">= 1.6"
  # Provider-free: it only renders text, so it can be checked offline.
}
