// Text from files, as messages may show it.
#ifndef EDGEQ_TEXT_H_
#define EDGEQ_TEXT_H_

#include <string>

namespace edgeq {

// `text` with every byte outside printable ASCII as \xNN: a message stays one line of valid text, whatever a
// damaged file held.
inline std::string Printable(const std::string& text) {
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : text) {
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(char(c));
    } else {
      out += "\\x";
      out.push_back(kHex[c >> 4]);
      out.push_back(kHex[c & 0xf]);
    }
  }
  return out;
}

}  // namespace edgeq

#endif  // EDGEQ_TEXT_H_
