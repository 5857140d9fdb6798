"""Generated from proto/coupon.proto by scripts/generate.sh. DO NOT EDIT."""
