#include "data/json_text.h"

#include <cstdint>
#include <optional>

#include "absl/strings/str_cat.h"

namespace moe::data {
namespace {

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

class Parser {
 public:
  explicit Parser(absl::string_view s) : s_(s) {}

  absl::StatusOr<std::string> Extract(absl::string_view key) {
    SkipSpace();
    if (!Peek('{')) return Fail("the line must be a JSON object ('{...}')");
    ++pos_;
    std::optional<std::string> found;
    bool value_is_string = false;
    SkipSpace();
    if (Peek('}')) {
      ++pos_;
    } else {
      while (true) {
        SkipSpace();
        if (!Peek('"')) return Fail("expected a '\"' starting an object key");
        std::string name;
        if (!ParseString(&name)) return error_;
        SkipSpace();
        if (!Peek(':')) return Fail("expected ':' after an object key");
        ++pos_;
        SkipSpace();
        if (name == key) {
          if (Peek('"')) {
            std::string value;
            if (!ParseString(&value)) return error_;
            found = std::move(value);
            value_is_string = true;
          } else {
            found.reset();
            value_is_string = false;
            const size_t at = pos_;
            if (!SkipValue()) return error_;
            key_error_ = absl::StrCat("key \"", key, "\" at column ", at + 1, " holds ", Describe(s_[at]),
                                      ", not a string");
          }
        } else if (!SkipValue()) {
          return error_;
        }
        SkipSpace();
        if (Peek(',')) {
          ++pos_;
          continue;
        }
        if (Peek('}')) {
          ++pos_;
          break;
        }
        return Fail("expected ',' or '}' in an object");
      }
    }
    SkipSpace();
    if (pos_ != s_.size()) return Fail("unexpected characters after the JSON object");
    if (!value_is_string) {
      if (!key_error_.empty()) return absl::InvalidArgumentError(key_error_);
      return absl::InvalidArgumentError(absl::StrCat("no key \"", key, "\" in the object"));
    }
    return std::move(*found);
  }

 private:
  static std::string Describe(char c) {
    switch (c) {
      case '{':
        return "an object";
      case '[':
        return "an array";
      case 't':
      case 'f':
        return "a boolean";
      case 'n':
        return "null";
      default:
        return "a number";
    }
  }

  bool Peek(char c) const { return pos_ < s_.size() && s_[pos_] == c; }
  void SkipSpace() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) {
      ++pos_;
    }
  }
  absl::Status Fail(absl::string_view what) {
    error_ = absl::InvalidArgumentError(
        absl::StrCat("column ", pos_ + 1, ": ", what, pos_ < s_.size() ? "" : " (line ended)"));
    return error_;
  }
  bool FailB(absl::string_view what) {
    (void)Fail(what);
    return false;
  }

  bool Hex4(uint32_t* v) {
    if (pos_ + 4 > s_.size()) return FailB("\\u needs four hex digits");
    *v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_ + i];
      uint32_t d;
      if (c >= '0' && c <= '9')
        d = c - '0';
      else if (c >= 'a' && c <= 'f')
        d = c - 'a' + 10;
      else if (c >= 'A' && c <= 'F')
        d = c - 'A' + 10;
      else {
        pos_ += i;
        return FailB("\\u needs four hex digits");
      }
      *v = (*v << 4) | d;
    }
    pos_ += 4;
    return true;
  }

  // At '"'; decodes into *out (may be nullptr to skip).
  bool ParseString(std::string* out) {
    ++pos_;
    while (true) {
      if (pos_ >= s_.size()) return FailB("unterminated string");
      const char c = s_[pos_];
      if (c == '"') {
        ++pos_;
        return true;
      }
      if (static_cast<unsigned char>(c) < 0x20) {
        return FailB("raw control character in a string (write it as \\n, \\t or \\u00XX)");
      }
      if (c != '\\') {
        if (out) out->push_back(c);
        ++pos_;
        continue;
      }
      ++pos_;
      if (pos_ >= s_.size()) return FailB("unterminated escape");
      const char e = s_[pos_++];
      char plain = 0;
      switch (e) {
        case '"':
          plain = '"';
          break;
        case '\\':
          plain = '\\';
          break;
        case '/':
          plain = '/';
          break;
        case 'b':
          plain = '\b';
          break;
        case 'f':
          plain = '\f';
          break;
        case 'n':
          plain = '\n';
          break;
        case 'r':
          plain = '\r';
          break;
        case 't':
          plain = '\t';
          break;
        case 'u': {
          uint32_t cp;
          if (!Hex4(&cp)) return false;
          if (cp >= 0xDC00 && cp <= 0xDFFF) {
            pos_ -= 6;
            return FailB("lone low surrogate \\u escape (U+DC00..U+DFFF without a preceding high surrogate)");
          }
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (pos_ + 2 > s_.size() || s_[pos_] != '\\' || s_[pos_ + 1] != 'u') {
              return FailB("high surrogate \\u escape not followed by a \\u low surrogate");
            }
            pos_ += 2;
            uint32_t lo;
            if (!Hex4(&lo)) return false;
            if (lo < 0xDC00 || lo > 0xDFFF) {
              pos_ -= 6;
              return FailB("high surrogate \\u escape not followed by a low surrogate (U+DC00..U+DFFF)");
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          if (out) AppendUtf8(cp, out);
          continue;
        }
        default:
          --pos_;
          return FailB(absl::StrCat("invalid escape '\\", std::string(1, e), "'"));
      }
      if (out) out->push_back(plain);
    }
  }

  bool ParseNumber() {
    const size_t start = pos_;
    if (Peek('-')) ++pos_;
    auto digit = [&] { return pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9'; };
    if (Peek('0')) {
      ++pos_;
    } else if (digit()) {
      while (digit()) ++pos_;
    } else {
      return FailB("invalid number");
    }
    if (Peek('.')) {
      ++pos_;
      if (!digit()) return FailB("invalid number: digits must follow '.'");
      while (digit()) ++pos_;
    }
    if (Peek('e') || Peek('E')) {
      ++pos_;
      if (Peek('+') || Peek('-')) ++pos_;
      if (!digit()) return FailB("invalid number: digits must follow the exponent");
      while (digit()) ++pos_;
    }
    return pos_ > start;
  }

  bool Literal(absl::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return FailB("invalid literal (expected true, false or null)");
    pos_ += word.size();
    return true;
  }

  bool SkipValue(int depth = 0) {
    if (depth > 512) return FailB("nesting deeper than 512");
    SkipSpace();
    if (pos_ >= s_.size()) return FailB("expected a value");
    const char c = s_[pos_];
    if (c == '"') return ParseString(nullptr);
    if (c == 't') return Literal("true");
    if (c == 'f') return Literal("false");
    if (c == 'n') return Literal("null");
    if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber();
    if (c == '[' || c == '{') {
      const char close = c == '[' ? ']' : '}';
      ++pos_;
      SkipSpace();
      if (Peek(close)) {
        ++pos_;
        return true;
      }
      while (true) {
        SkipSpace();
        if (c == '{') {
          if (!Peek('"')) return FailB("expected a '\"' starting an object key");
          if (!ParseString(nullptr)) return false;
          SkipSpace();
          if (!Peek(':')) return FailB("expected ':' after an object key");
          ++pos_;
        }
        if (!SkipValue(depth + 1)) return false;
        SkipSpace();
        if (Peek(',')) {
          ++pos_;
          continue;
        }
        if (Peek(close)) {
          ++pos_;
          return true;
        }
        return FailB(c == '[' ? "expected ',' or ']' in an array" : "expected ',' or '}' in an object");
      }
    }
    return FailB(absl::StrCat("unexpected character '", std::string(1, c), "'"));
  }

  absl::string_view s_;
  size_t pos_ = 0;
  absl::Status error_;
  std::string key_error_;
};

}  // namespace

absl::StatusOr<std::string> ExtractJsonStringField(absl::string_view line, absl::string_view key) {
  Parser p(line);
  return p.Extract(key);
}

}  // namespace moe::data
