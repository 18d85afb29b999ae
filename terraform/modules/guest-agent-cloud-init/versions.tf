terraform {
  required_version = ">= 1.9" # validations that name another variable
  # Provider-free: it only renders text, so it can be checked offline.
}
