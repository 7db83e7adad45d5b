"""The gpushare wire API: versioned protobuf definitions and their generated code."""
