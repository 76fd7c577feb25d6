"""The demo zoo: small digit models with data, so merges can be scored offline in seconds."""
